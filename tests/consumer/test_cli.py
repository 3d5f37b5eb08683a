"""The ``lash-consumer`` CLI against a real worker: dead letters, watch, admin commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest

from consumer.ingress import ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER, ROUTING_KEY_HEADER
from consumer.producer import Producer
from tests.consumer.fleet import REPO_ROOT, Fleet, fleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.timeout(180)]


async def cli(f: Fleet, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consumer.cli", *args],
        cwd=REPO_ROOT,
        env=f.env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


async def test_dead_letters_list_and_requeue(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path) as f:
        await f.start()
        session = f"dl-{uuid.uuid4().hex[:6]}"
        body = json.dumps(
            {
                "protocol_version": 1,
                "type": "turn_input.submit",
                "session_id": session,
                "source_key": "revived",
                "input": {"items": [{"type": "text", "text": "back from the dead"}]},
            }
        ).encode()
        async with await Producer.connect(amqp_url, clean_namespace) as producer:
            # a message that was dead-lettered while the database was down
            channel = await producer.connection.channel(publisher_confirms=True)
            dead_letter = await channel.get_exchange(f"{clean_namespace}.dead-letter")
            await dead_letter.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    message_id="m-1",
                    headers={
                        ERROR_CODE_HEADER: "store_unavailable",
                        ERROR_MESSAGE_HEADER: "failed 5 deliveries",
                        ROUTING_KEY_HEADER: "turn_input.submit",
                    },
                ),
                routing_key="turn_input.submit",
            )
            await channel.close()

            listed = await cli(f, "dead-letters", "--json")
            assert listed.returncode == 0, listed.stderr
            letters = json.loads(listed.stdout)
            assert [(x["error_code"], x["message_id"]) for x in letters] == [
                ("store_unavailable", "m-1")
            ]
            text = await cli(f, "dead-letters")
            assert "store_unavailable" in text.stdout and "back from" in text.stdout

            requeued = await cli(f, "dead-letters", "--requeue")
            assert "requeued 1" in requeued.stdout, requeued.stdout + requeued.stderr
            assert json.loads((await cli(f, "dead-letters", "--json")).stdout) == []

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                read = await producer.read(session)
                if any(m.text == "back from the dead" for m in read.messages):
                    break
                assert loop.time() < deadline, read
                await asyncio.sleep(0.2)


async def test_watch_inspect_cancel_input_vacuum_migrate(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path, echo_delay_ms=200) as f:
        await f.start()
        session = f"w-{uuid.uuid4().hex[:6]}"
        assert (await cli(f, "migrate")).returncode == 0
        watch = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "consumer.cli", "watch", session, "--after-seq", "0"],
            cwd=REPO_ROOT,
            env=f.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            await asyncio.sleep(1.5)  # let watch bind its queue
            sent = await cli(f, "send", session, "watch me", "--wait")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "echo: watch me" in sent.stdout
            await asyncio.sleep(1.0)
        finally:
            watch.terminate()
            out, _ = await asyncio.to_thread(watch.communicate, timeout=20)
        assert "input.admitted" in out and "watch me" in out
        assert "turn.started" in out and "turn.committed" in out
        assert "echo: watch me" in out

        inspected = await cli(f, "inspect", session, "--json")
        assert inspected.returncode == 0, inspected.stderr
        info = json.loads(inspected.stdout)
        assert info["last_seq"] == 3 and info["pending_inputs"] == []
        assert info["lease"]["generation"] >= 1
        assert [e["type"] for e in info["last_events"]] == [
            "input.admitted",
            "turn.started",
            "turn.committed",
        ]
        assert "last events" in (await cli(f, "inspect", session)).stdout

        missing = await cli(f, "cancel-input", session, "nope", "--source-key")
        assert missing.returncode == 0 and "not_found" in missing.stdout

        vacuumed = await cli(f, "vacuum", "--older-than-s", "0", "--session-id", session)
        assert vacuumed.returncode == 0, vacuumed.stderr
        assert json.loads(vacuumed.stdout)["removed_input_tombstones"] == 1
