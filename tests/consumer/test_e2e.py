"""End to end: real ``lash-consumer run`` processes, real PostgreSQL and RabbitMQ.

Each test owns a fresh database and namespace and always stops its workers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from consumer.ingress import ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER
from consumer.producer import Producer, target
from consumer.wire import SubmitMessage
from lash_core.inputs import TextItem, TurnInput
from tests.consumer.checks import (
    assert_gapless,
    assert_message_properties,
    assert_turns_never_overlap,
    by_session,
    collect_until,
    committed_inputs,
    read_all_events,
    wait_for_event,
)
from tests.consumer.fleet import REPO_ROOT, fleet
from tests.consumer.harness import get_dead_letters

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.timeout(240)]


def sid(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_send_wait_prints_the_reply(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path) as f:
        await f.start()
        session = sid("cli")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer.cli", "send", session, "hello cli", "--wait"],
            cwd=REPO_ROOT,
            env=f.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "echo: hello cli" in result.stdout
        receipt = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
        assert receipt["status"] == "admitted"
        read = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer.cli", "read", session],
            cwd=REPO_ROOT,
            env=f.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "[user] hello cli" in read.stdout and "[assistant] echo: hello cli" in read.stdout


async def test_two_workers_commit_every_input_once_in_order(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path, echo_delay_ms=20) as f:
        await f.start()
        await f.start()
        async with (
            await Producer.connect(amqp_url, clean_namespace) as producer,
            producer.observe() as observer,
        ):
            sessions = [sid("many") for _ in range(12)]
            admitted: dict[str, list[str]] = {s: [] for s in sessions}

            async def feed(session: str) -> None:
                for n in range(6):
                    receipt = await producer.submit(session, f"{session} #{n}", source_key=f"k{n}")
                    assert receipt.status == "admitted" and receipt.input is not None
                    admitted[session].append(receipt.input.input_id)
                    # a redelivered / re-published message is admitted once
                    again = await producer.submit(session, f"{session} #{n}", source_key=f"k{n}")
                    assert again.status == "duplicate"

            await asyncio.gather(*(feed(s) for s in sessions))
            total = sum(len(v) for v in admitted.values())
            events: list[dict[str, Any]] = []

            def all_committed(evs: list[dict[str, Any]]) -> bool:
                return sum(len(v) for v in committed_inputs(evs).values()) >= total

            await collect_until(observer, events, all_committed, timeout_s=120)
            assert committed_inputs(events) == admitted  # exactly once, admission order
            assert_turns_never_overlap(events)
            assert_message_properties(observer)
            await asyncio.sleep(0.3)
            events.extend(observer.pending())
            assert_gapless(events)
            # session.read returns the same durable history, from any worker
            for session in sessions[:3]:
                history = await read_all_events(producer, session)
                assert history == by_session(events)[session]
            # both workers did work
            logs = [w.log() for w in f.workers]
            assert all('"turn_committed"' in log for log in logs), "one worker stayed idle"


async def test_steering_cancel_and_suffix_cancel_across_workers(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path, echo_delay_ms=1500) as f:
        await f.start()
        await f.start()
        session = sid("steer")
        async with (
            await Producer.connect(amqp_url, clean_namespace) as producer,
            producer.observe(session) as observer,
        ):
            events: list[dict[str, Any]] = []
            first = await producer.submit(session, "first", source_key="a")
            assert first.input is not None
            started = await wait_for_event(observer, events, lambda e: e["type"] == "turn.started")
            turn_id = started["turn_id"]
            assert started["input_ids"] == [first.input.input_id]

            # steering: aimed at the running turn, taken in at a checkpoint
            steer = await producer.submit(session, "also this", steer_turn_id=turn_id)
            assert steer.input is not None
            assert steer.input.ingress.scope == "active_turn"
            assert steer.input.state == "pending_active"

            # next-turn inputs queued behind the running turn; cancel a suffix of them
            queued = []
            for n in range(3):
                r = await producer.submit(session, f"later {n}", source_key=f"later-{n}")
                assert r.input is not None
                queued.append(r.input.input_id)
            suffix = await producer.cancel_suffix(session, target("later-1", "source_key"))
            assert suffix.status == "ok" and suffix.results is not None
            cancelled = {r.input.input_id for r in suffix.results if r.input}
            assert cancelled == {queued[1], queued[2]}
            assert all(r.outcome == "cancelled" for r in suffix.results)

            committed = await wait_for_event(
                observer,
                events,
                lambda e: e["type"] == "turn.committed" and e["turn_id"] == turn_id,
                timeout_s=60,
            )
            assert committed["outcome"]["kind"] == "finished"
            assert steer.input.input_id in committed["input_ids"]
            assert any(
                e["type"] == "input.accepted" and steer.input.input_id in e["input_ids"]
                for e in events
            )

            # the surviving queued input runs next; cancel that turn wherever it runs
            second = await wait_for_event(
                observer, events, lambda e: e["type"] == "turn.started" and e["turn_id"] != turn_id
            )
            assert second["input_ids"] == [queued[0]]
            cancel = await producer.cancel_turn(session, reason="user pressed stop")
            assert cancel.status == "cancel_requested"
            assert cancel.turn_id == second["turn_id"]
            stopped = await wait_for_event(
                observer,
                events,
                lambda e: e["type"] == "turn.committed" and e["turn_id"] == second["turn_id"],
            )
            assert stopped["outcome"] == {
                "kind": "stopped",
                "stop": "cancelled",
                "message": stopped["outcome"].get("message"),
            }
            assert stopped["input_ids"] == [queued[0]]

            idle = await producer.cancel_turn(session)
            assert idle.status == "no_running_turn"

            # the cancelled inputs never ran; the history is gapless and well ordered
            history = await read_all_events(producer, session)
            assert_gapless(history)
            assert_turns_never_overlap(history)
            ran = committed_inputs(history)[session]
            assert ran == [first.input.input_id, steer.input.input_id, queued[0]]
            assert not cancelled & set(ran)


async def test_bad_input_is_dead_lettered_and_the_worker_keeps_serving(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path, max_message_bytes=2048) as f:
        worker = await f.start()
        async with await Producer.connect(amqp_url, clean_namespace) as producer:
            cases = [
                (b"{oops", "invalid_json"),
                (b"\xc3\x28", "invalid_utf8"),
                (
                    json.dumps({"protocol_version": 1, "type": "x.y", "session_id": "s"}).encode(),
                    "unknown_type",
                ),
                (
                    json.dumps(
                        {"protocol_version": 9, "type": "session.read", "session_id": "s"}
                    ).encode(),
                    "unsupported_protocol_version",
                ),
                (
                    json.dumps(
                        {"protocol_version": 1, "type": "turn_input.submit", "session_id": "s"}
                    ).encode(),
                    "invalid_message",
                ),
                (b"{" + b" " * 3000 + b"}", "too_large"),
            ]
            for raw, code in cases:
                reply = await producer.publish_raw(
                    raw, "turn_input.submit", message_id=uuid.uuid4().hex
                )
                assert reply is not None and reply["status"] == "rejected"
                assert reply["error"]["code"] == code
            dead = await get_dead_letters(producer.connection, clean_namespace, len(cases))
            assert sorted(m.headers[ERROR_CODE_HEADER] for m in dead) == sorted(c for _, c in cases)
            assert all(m.headers[ERROR_MESSAGE_HEADER] for m in dead)
            assert {m.body for m in dead} == {raw for raw, _ in cases}

            session = sid("ok")
            async with producer.observe(session) as observer:
                ok = await producer.submit(session, "still serving")
                assert ok.status == "admitted"
                events: list[dict[str, Any]] = []
                await wait_for_event(observer, events, lambda e: e["type"] == "turn.committed")
        assert await worker.stop() == 0


async def test_sigterm_exits_zero_and_backlog_is_processed_after_restart(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(
        db_url, amqp_url, clean_namespace, tmp_path, echo_delay_ms=3000, shutdown_grace_s=0.5
    ) as f:
        worker = await f.start()
        session = sid("restart")
        async with (
            await Producer.connect(amqp_url, clean_namespace) as producer,
            producer.observe(session) as observer,
        ):
            events: list[dict[str, Any]] = []
            first = await producer.submit(session, "slow one", source_key="slow")
            assert first.input is not None
            started = await wait_for_event(observer, events, lambda e: e["type"] == "turn.started")
            # SIGTERM mid-turn: grace passes, the turn commits as stopped/cancelled, exit 0
            assert await worker.stop() == 0
            stopped = await wait_for_event(
                observer,
                events,
                lambda e: e["type"] == "turn.committed" and e["turn_id"] == started["turn_id"],
                timeout_s=10,
            )
            assert stopped["outcome"]["kind"] == "stopped"
            assert stopped["outcome"]["stop"] == "cancelled"

            # published while no worker runs: waits in the queue, nothing lost
            for n in range(3):
                message = SubmitMessage(
                    session_id=session,
                    source_key=f"off-{n}",
                    input=TurnInput(items=[TextItem(text=f"offline {n}")]),
                )
                await producer.send(message, reply=False)
            restarted = await f.start(echo_delay_ms=0)
            await collect_until(
                observer,
                events,
                lambda evs: len(committed_inputs(evs).get(session, [])) >= 4,
                timeout_s=60,
            )
            history = await read_all_events(producer, session)
            assert_gapless(history)
            assert_turns_never_overlap(history)
            assert len(committed_inputs(history)[session]) == 4
            assert await restarted.stop() == 0


async def test_session_read_recovers_missed_events(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    async with fleet(db_url, amqp_url, clean_namespace, tmp_path) as f:
        await f.start()
        session = sid("gap")
        async with await Producer.connect(amqp_url, clean_namespace) as producer:
            # nobody observes these
            for n in range(3):
                await producer.submit(session, f"unseen {n}", source_key=f"u{n}")
            # wait until those turns are committed and published before observing
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                view = await producer.read(session)
                if not view.pending_inputs and view.running_turn_id is None and view.messages:
                    break
                assert loop.time() < deadline, "unseen inputs were not processed"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            async with producer.observe(session) as observer:
                events: list[dict[str, Any]] = []
                seen = await producer.submit(session, "seen", source_key="seen")
                assert seen.input is not None
                seen_id = seen.input.input_id
                await wait_for_event(
                    observer,
                    events,
                    lambda e: e["type"] == "turn.committed" and seen_id in e["input_ids"],
                )
                observed = {e["seq"]: e for e in events if e.get("durable") is not False}
                first_seen = min(observed)
                assert first_seen > 1  # the observer missed the start of the session
                read = await producer.read(session, after_seq=0)
                assert read.gap is False and read.events is not None
                recovered = [e.model_dump(mode="json") for e in read.events]
                assert [e["seq"] for e in recovered] == list(range(1, read.last_seq + 1))
                for e in recovered:
                    if e["seq"] in observed:
                        assert observed[e["seq"]] == e
                # after_seq returns exactly the events the observer missed
                missed = await producer.read(session, after_seq=first_seen - 1)
                assert missed.events is not None
                assert [e.seq for e in missed.events] == list(range(first_seen, read.last_seq + 1))
                texts = [m.text for m in read.messages if m.role == "user"]
                assert texts[-1] == "seen"


async def test_a_killed_workers_session_is_taken_over(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    from lash_core.store.postgres import PostgresStore

    async with fleet(db_url, amqp_url, clean_namespace, tmp_path, echo_delay_ms=2000) as f:
        workers = {w.name: w for w in [await f.start(), await f.start()]}
        session = sid("crash")
        store = PostgresStore(db_url, pool_size=1)
        await store.start()
        try:
            async with (
                await Producer.connect(amqp_url, clean_namespace) as producer,
                producer.observe(session) as observer,
            ):
                events: list[dict[str, Any]] = []
                receipt = await producer.submit(session, "survive", source_key="c")
                assert receipt.input is not None
                started = await wait_for_event(
                    observer, events, lambda e: e["type"] == "turn.started"
                )
                lease = await store.read_lease(session)
                assert lease is not None and lease.owner is not None
                holder = workers[lease.owner.owner_id]
                assert await holder.stop(signal.SIGKILL) == -signal.SIGKILL
                committed = await wait_for_event(
                    observer,
                    events,
                    lambda e: (
                        e["type"] == "turn.committed" and receipt.input.input_id in e["input_ids"]
                    ),
                    timeout_s=60,
                )
                assert committed["turn_id"] != started["turn_id"]
                assert committed["outcome"]["kind"] == "finished"
                history = await read_all_events(producer, session)
                assert_gapless(history)
                assert committed_inputs(history)[session] == [receipt.input.input_id]
        finally:
            await store.close()


async def test_producer_first_then_session_commands(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    session = sid("cmd")
    async with (
        fleet(db_url, amqp_url, clean_namespace, tmp_path) as f,
        await Producer.connect(amqp_url, clean_namespace) as producer,
        producer.observe(session) as observer,
    ):
        # no worker has ever run in this namespace: the producer declared the topology
        early = SubmitMessage(
            session_id=session,
            source_key="early",
            input=TurnInput(items=[TextItem(text="before any worker")]),
        )
        await producer.send(early, reply=False)
        await f.start()
        events: list[dict[str, Any]] = []
        await wait_for_event(observer, events, lambda e: e["type"] == "turn.committed")
        before = await producer.read(session)
        assert before.messages[0].text == "before any worker"

        reset = await producer.command(session, "reset_session", idempotency_key="r1")
        assert reset.status == "admitted"
        assert (await producer.command(session, "reset_session", idempotency_key="r1")).status == (
            "duplicate"
        )
        applied = await wait_for_event(
            observer, events, lambda e: e["type"] == "session.command_applied"
        )
        assert applied["command"]["kind"] == "reset_session"
        after = await producer.read(session)
        assert after.messages == []
        refresh = await producer.command(session, "refresh_tool_catalog")
        assert refresh.status == "admitted"
        await wait_for_event(
            observer,
            events,
            lambda e: (
                e["type"] == "session.command_applied"
                and e["command"]["kind"] == "refresh_tool_catalog"
            ),
        )
        history = await read_all_events(producer, session)
        assert_gapless(history)
