#!/usr/bin/env bash
# Start local PostgreSQL and RabbitMQ if they are not already answering.
# Used by scripts/run.sh and scripts/test.sh; a no-op where the services already run
# (or where LASH_DATABASE_URL / LASH_AMQP_URL point elsewhere and answer).
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
mq_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "services: starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  else
    echo "services: PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not available" >&2
  fi
fi
if ! mq_up; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: starting RabbitMQ" >&2
    rabbitmq-server -detached || true
  else
    echo "services: RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed" >&2
  fi
fi
for _ in $(seq 1 120); do
  if pg_up && mq_up; then break; fi
  sleep 1
done
if command -v rabbitmq-diagnostics >/dev/null 2>&1; then
  rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || sleep 5
fi
pg_up && echo "services: PostgreSQL up" >&2 || echo "services: PostgreSQL still down" >&2
mq_up && echo "services: RabbitMQ up" >&2 || echo "services: RabbitMQ still down" >&2
