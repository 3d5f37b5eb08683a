# syntax=docker/dockerfile:1
# lash-consumer worker image.
#
#   docker build -t lash-consumer .
#   docker run --rm -e LASH_DATABASE_URL=... -e LASH_AMQP_URL=... -p 8080:8080 lash-consumer
#
# Stage 1 builds the project and every dependency as wheels; stage 2 installs those wheels
# into a clean slim image (no compiler, no pip cache, no sources) and runs as a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lash_core ./lash_core
COPY consumer ./consumer
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LASH_HTTP_PORT=8080 \
    LASH_LOG_FORMAT=json
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/lash_consumer-*.whl \
    && groupadd --system --gid 10001 lash \
    && useradd --system --uid 10001 --gid lash --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin lash
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
# Liveness over the worker's own HTTP server (python: the slim image has no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LASH_HTTP_PORT', '8080'), timeout=2)"]
# SIGTERM (docker stop) starts a graceful drain of LASH_SHUTDOWN_GRACE_S seconds; give the
# container at least that long before SIGKILL (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lash-consumer"]
CMD ["run"]
