"""The benchmark works end to end on a handful of messages (never any timing assertion).

The harness is checked against the raw baseline always, and against real worker
processes when ``consumer.cli`` exists; the pure parts (matching commits to publishes,
percentiles, the profile summary, the table) are checked without services.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bench.amqp_io import publish_workload
from bench.measure import RunSpec, latency_window_s, measure
from bench.options import BenchOptions, parse_options
from bench.procs import busy_and_steal_ticks
from bench.profiling import summarize_collapsed
from bench.report import (
    attach_baseline_ratios,
    render_repeats,
    render_stages,
    render_table,
    render_windows,
    summarise_repeats,
    write_json,
)
from bench.run import latency_shape, run_bench
from bench.stages import breakdown, stamps_from_events
from bench.statements import count_statements, statements_report
from bench.stats import latency_summary, percentile
from bench.targets import BaselineTarget
from bench.tracker import CommitTracker
from bench.workload import SUBMIT_TYPE, build_workload
from consumer import broker
from tests import services


def _options(tmp_path: Path, **overrides: Any) -> BenchOptions:
    opts = BenchOptions(
        workers=[1],
        sessions=3,
        inputs_per_session=2,
        concurrency=4,
        modes=["throughput"],
        database_url=services.base_database_url(),
        amqp_url=services.base_amqp_url(),
        namespace_prefix="lashtbench",
        results_dir=tmp_path,
        progress=False,
        stall_timeout_s=30.0,
        idle_probe_s=1.0,
    )
    for name, value in overrides.items():
        setattr(opts, name, value)
    return opts


def _check_run(run: dict[str, Any], inputs: int) -> None:
    assert "error" not in run, run.get("error")
    assert run["inputs_published"] == inputs
    assert run["inputs_committed"] == inputs
    assert 1 <= run["turns"] <= inputs
    assert run["latency_ms"]["count"] == inputs
    for key in ("p50", "p95", "p99", "max", "mean"):
        assert run["latency_ms"][key] >= 0
    assert run["turns_per_s"] > 0 and run["inputs_per_s"] > 0
    assert run["db"]["xact_commit"] >= 0 and run["db"]["tx_per_turn"] is not None
    assert run["db"]["idle_tx_per_s"] is not None and run["db"]["idle_tx_per_s"] >= 0
    assert run["cpu"]["ms_per_turn"] is not None
    # Read in clock ticks (10 ms), so a tiny run's window may read zero; the servers may
    # also run elsewhere (containers).
    for part in ("host", "workers", "postgres", "rabbitmq"):
        assert run["cpu"][f"{part}_ms_per_input"] >= 0
    assert 0 <= run["cpu"]["steal_share"] <= 1
    assert run["amqp"]["publishes"] == inputs
    assert run["amqp"]["events"] >= run["turns"]
    assert run["amqp"]["per_turn"] is not None
    assert run["amqp"]["ingress_left"] == 0
    assert len(run["rss_kib"]["end"]) == run["workers"]
    assert run["rss_kib"]["peak_max"] >= run["rss_kib"]["end_max"] > 0
    assert run["unmatched_commits"] == 0


@pytest.mark.postgres
@pytest.mark.rabbitmq
async def test_baseline_run_counts_every_input(tmp_path: Path) -> None:
    opts = _options(tmp_path, nice=5)  # the processes under test run under nice(1)
    run = await measure(BaselineTarget(), RunSpec("throughput", 1, 3, 2, 4), opts)
    _check_run(run, 6)
    assert run["kind"] == "baseline"
    assert run["turns"] == 6  # the baseline confirms each message on its own
    assert run["events_by_type"] == {"baseline.committed": 6}


@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
async def test_pipeline_and_baseline_report(tmp_path: Path) -> None:
    opts = _options(tmp_path, modes=["throughput", "latency"], rate=20.0, latency_duration_s=0.1)
    results = await run_bench(opts, stamp="smoke")
    runs = results["runs"]
    assert [(r["mode"], r["kind"]) for r in runs] == [
        ("throughput", "baseline"),
        ("throughput", "pipeline"),
        ("latency", "baseline"),
        ("latency", "pipeline"),
    ]
    for run in runs:
        _check_run(run, 6)
    pipeline = runs[1]
    assert pipeline["outcomes"] and all(o.startswith("finished/") for o in pipeline["outcomes"])
    assert pipeline["events_by_type"].get("turn.committed", 0) >= pipeline["turns"]
    assert pipeline["vs_baseline"]["inputs_per_s"] is not None
    assert runs[3]["rate_target"] == 20.0
    # Every pipeline input is split into stages from its stored events; the baseline has none.
    for run in (runs[1], runs[3]):
        assert run["stages_ms"]["count"] == 6
        assert run["stages_ms"]["stages"]["wait"]["p50"] >= 0
    assert runs[0]["stages_ms"] is None
    # Paced runs also give their latency over time; bursts do not.
    assert sum(w["count"] for w in runs[3]["latency_windows"]) == 6
    assert runs[1]["latency_windows"] is None
    assert "egress" in render_stages(runs[3]["stages_ms"])
    path = write_json(tmp_path / "smoke.json", results)
    assert json.loads(path.read_text())["runs"][1]["inputs_committed"] == 6
    table = render_table(runs)
    assert "pipeline" in table and "baseline" in table and "FAILED" not in table


def test_tracker_matches_commits_by_input_id_or_source_key() -> None:
    subs = build_workload(2, 2, tag="t")
    tracker = CommitTracker()
    tracker.expect(subs)
    for index, sub in enumerate(subs):
        tracker.published(sub.input_id, at=float(index))
    a, b, c, d = subs
    tracker.committed("s0:turn1", [a.input_id], "finished/assistant_message", at=10.0)
    # A worker-minted id, seen committed before its admission event names the source key.
    tracker.committed("s1:turn1", ["ti_minted"], "finished/assistant_message", at=11.0)
    tracker.admitted(b.session_id, b.source_key, "ti_minted")
    tracker.committed("s0:turn1", [a.input_id], "finished/assistant_message", at=12.0)
    assert tracker.duplicate_events == 1
    tracker.committed("s0:turn2", [c.input_id, d.input_id], None, at=13.0)
    assert sorted(tracker.latencies_ms()) == [10000.0, 10000.0, 10000.0, 11000.0]
    assert len(tracker.turns) == 3 and tracker.unmatched == 0
    assert tracker.seen_message("x:1") is False and tracker.seen_message("x:1") is True


def test_stage_breakdown_splits_latency_at_the_stored_event_stamps() -> None:
    rows = [
        ("input.admitted", 1_010, {"input": {"input_id": "a"}}),
        ("input.admitted", 1_020, {"input": {"input_id": "b"}}),
        ("turn.started", 1_030, {"input_ids": ["a", "b"]}),
        ("turn.started", 1_090, {"input_ids": ["a"]}),  # a replay: the first start counts
        ("turn.committed", 1_040, {"input_ids": ["a", "b"]}),
        ("input.admitted", 1_000, {"input": {"input_id": "c"}}),  # never started
    ]
    stamps = stamps_from_events(rows)
    assert stamps["a"] == {"admitted": 1_010, "started": 1_030, "committed": 1_040}
    assert "started" not in stamps["c"]
    report = breakdown(
        stamps, {"a": 1_000.0, "b": 1_000.0, "c": 990.0}, {"a": 1_045.0, "b": 1_300.0}
    )
    assert report["count"] == 2  # c has no start or observation
    slowest = report["slowest"]
    assert slowest["count"] == 1 and slowest["total_ms_min"] == 300.0  # b
    assert slowest["mean_ms"] == {"ingress": 20.0, "wait": 10.0, "turn": 10.0, "egress": 260.0}
    assert report["stages"]["ingress"]["p50"] == 10.0  # a's, nearest rank of [10, 20]
    assert breakdown({}, {}, {}) == {"count": 0}


def test_latency_windows_group_inputs_by_publish_time() -> None:
    tracker = CommitTracker()
    subs = build_workload(4, 1, tag="win")
    tracker.expect(subs)
    # Published at 100.0, 101.0, 106.0, 112.0; each takes 10, 20, 30, 40 ms.
    for sub, at, took in zip(subs, (100.0, 101.0, 106.0, 112.0), (10, 20, 30, 40), strict=True):
        tracker.published(sub.input_id, at)
        tracker.committed(f"turn-{sub.input_id}", [sub.input_id], at=at + took / 1000.0)
    windows = tracker.latency_windows(5.0)
    assert [(w["start_s"], w["count"]) for w in windows] == [(0.0, 2), (5.0, 1), (10.0, 1)]
    assert windows[0]["max"] == pytest.approx(20.0)
    assert windows[2]["p50"] == pytest.approx(40.0)
    assert tracker.latency_windows(0) == [] and CommitTracker().latency_windows(5.0) == []
    table = render_windows(windows)
    assert len(table.splitlines()) == 4 and "10.0" in table
    assert latency_window_s(30.0) == 5.0 and latency_window_s(300.0) == 30.0


def test_percentiles_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    summary = latency_summary(values)
    assert summary["count"] == 100 and summary["p95"] == 95.0 and summary["max"] == 100.0
    assert latency_summary([]) == {"count": 0}


def test_profile_summary_groups_by_library() -> None:
    collapsed = (
        "run (asyncio/events.py:80);execute (sqlalchemy/engine/base.py:10) 3\n"
        "run (asyncio/events.py:80);dumps (json/encoder.py:5) 1\n"
    )
    text = summarize_collapsed(collapsed)
    assert "4 samples" in text
    assert "75.0%  sqlalchemy" in text


def test_statement_counting_from_a_server_log(tmp_path: Path) -> None:
    log = tmp_path / "postgresql.log"
    log.write_text(
        "2026-11-21 21:00:00.000 UTC [1] postgres@other LOG:  statement: BEGIN\n"
        "2026-11-21 21:00:00.001 UTC [2] postgres@lash_bench_x LOG:  statement: BEGIN\n"
        "2026-11-21 21:00:00.002 UTC [2] postgres@lash_bench_x LOG:  execute _pg3_1: SELECT  1\n"
        "2026-11-21 21:00:00.003 UTC [2] postgres@lash_bench_x DETAIL:  parameters: $1 = 'x'\n"
        "2026-11-21 21:00:00.004 UTC [2] postgres@lash_bench_x LOG:  statement: COMMIT\n"
        "2026-11-21 21:00:00.005 UTC [2] postgres@lash_bench_x LOG:  statement: BEGIN\n"
        "2026-11-21 21:00:00.006 UTC [2] postgres@lash_bench_x LOG:  execute <unnamed>: \n"
        "\t    UPDATE lash_leases\n"
        "\t    SET x = 1\n"
        "2026-11-21 21:00:00.007 UTC [2] postgres@lash_bench_x LOG:  statement: "
        "BEGIN; EXECUTE lash_lock_lease('s-1', 7)\n"
        "2026-11-21 21:00:00.008 UTC [2] postgres@lash_bench_x LOG:  statement: "
        "BEGIN; EXECUTE lash_lock_lease('it''s s-2', 12)\n"
    )
    counts = count_statements(log, 0, log.stat().st_size, "lash_bench_x")
    # Literals are masked, so one statement shape is one count whatever its arguments.
    assert counts == {
        "BEGIN": 2,
        "SELECT ?": 1,
        "COMMIT": 1,
        "UPDATE lash_leases": 1,
        "BEGIN; EXECUTE lash_lock_lease(?, ?)": 2,
    }
    report = statements_report(counts, turns=2)
    assert report["total"] == 7 and report["per_turn"] == 3.5
    assert report["top"][0] == {"statement": "BEGIN", "count": 2, "per_turn": 1.0}


def test_latency_shape_spreads_inputs_over_sessions() -> None:
    assert latency_shape(200, 5, 4.0, 30.0) == (120, 1)
    assert latency_shape(200, 5, 1000.0, 30.0) == (200, 5)
    assert latency_shape(3, 2, 20.0, 0.1) == (3, 2)
    assert latency_shape(100, 5, 0.1, 1.0) == (20, 1)


def test_report_ratio_and_options() -> None:
    base = {
        "kind": "baseline",
        "mode": "throughput",
        "workers": 1,
        "sessions": 1,
        "inputs_per_session": 1,
        "inputs_per_s": 100.0,
        "latency_ms": {"p99": 10.0},
    }
    pipe = {
        **base,
        "kind": "pipeline",
        "inputs_per_s": 50.0,
        "turns_per_s": 25.0,
        "latency_ms": {"p99": 40.0},
    }
    attach_baseline_ratios([base, pipe])
    assert pipe["vs_baseline"] == {
        "inputs_per_s": 0.5,
        "turns_per_s_vs_messages_per_s": 0.25,
        "p99_latency": 4.0,
    }
    opts = parse_options(["--quick", "--workers", "1,3", "--modes", "all", "--rate", "5"])
    assert opts.workers == [1, 3] and opts.sessions == 20 and opts.rate == 5.0
    assert opts.modes == ["throughput", "latency", "scale"] and opts.latency_w == 3
    assert opts.nice == 0 and parse_options(["--nice", "10"]).nice == 10


def test_repeated_runs_pair_with_their_own_baseline_and_give_medians() -> None:
    def run(kind: str, repeat: int, inputs_per_s: float, cpu: float = 5.0) -> dict[str, Any]:
        return {
            "kind": kind,
            "mode": "throughput",
            "workers": 2,
            "sessions": 10,
            "inputs_per_session": 5,
            "repeat": repeat,
            "inputs_per_s": inputs_per_s,
            "turns_per_s": inputs_per_s / 2,
            "latency_ms": {"p99": 100.0 + repeat},
            "cpu": {"ms_per_turn": cpu},
        }

    runs = [
        run("baseline", 0, 1000.0),
        run("pipeline", 0, 400.0, 6.0),
        run("pipeline", 1, 300.0, 5.0),  # the second pair runs the pipeline first
        run("baseline", 1, 500.0),
        run("baseline", 2, 800.0),
        run("pipeline", 2, 360.0, 7.0),
        {**run("pipeline", 3, 1.0), "error": "stalled"},  # a failed run counts nowhere
    ]
    attach_baseline_ratios(runs)
    ratios = [r["vs_baseline"]["inputs_per_s"] for r in runs[:6] if r["kind"] == "pipeline"]
    assert ratios == [0.4, 0.6, 0.45]
    assert "vs_baseline" not in runs[6]
    (summary,) = summarise_repeats(runs)
    assert summary["pipeline_runs"] == 3 and summary["baseline_runs"] == 3
    assert summary["ratio"] == {"median": 0.45, "min": 0.4, "max": 0.6}
    assert summary["pipeline_inputs_per_s"] == {"median": 360.0, "min": 300.0, "max": 400.0}
    assert summary["baseline_inputs_per_s"]["median"] == 800.0
    assert summary["pipeline_cpu_ms_per_turn"]["median"] == 6.0
    text = render_repeats([summary])
    assert "W=2 10x5: x base 0.450 [0.400-0.600] over 3 runs" in text
    # One run per W (no --repeat) gives no summary line.
    assert summarise_repeats([run("baseline", 0, 1.0), run("pipeline", 0, 1.0)]) == []
    assert parse_options(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        parse_options(["--repeat", "0"])


def test_host_busy_time_leaves_out_steal() -> None:
    line = "cpu  77171 0 18097 378958 1609 0 2629 9218 0 0"
    assert busy_and_steal_ticks(line) == (77171 + 18097 + 2629, 9218)
    assert busy_and_steal_ticks("cpu  10 0 5 100 1") == (15, 0)


@pytest.mark.rabbitmq
async def test_publisher_writes_bursts_in_batches_and_paced_runs_one_by_one() -> None:
    """Every submission reaches the broker confirmed, as a persistent submit with its own
    message id; a burst is stamped once per batch, a paced run once per message."""
    tag = uuid.uuid4().hex[:8]
    connection = await aio_pika.connect(services.base_amqp_url())
    try:
        channel = await broker.open_channel(connection)
        # Exclusive: the queue goes with the connection, whatever the test does.
        exchange = await channel.declare_exchange(f"lashtbench-{tag}", auto_delete=True)
        queue = await channel.declare_queue(f"lashtbench-{tag}", exclusive=True)
        await queue.bind(exchange, routing_key=SUBMIT_TYPE)
        burst = build_workload(35, 2, tag=f"{tag}a")
        tracker = CommitTracker()
        sent = await publish_workload(
            channel, exchange.name, SUBMIT_TYPE, burst, tracker, batch_size=32
        )
        assert sent == 70
        assert set(tracker.published_at) == {s.input_id for s in burst}
        stamps = [tracker.published_at[s.input_id] for s in burst]
        assert len(set(stamps)) == 3  # 32 + 32 + 6
        assert stamps[0] == stamps[31] != stamps[32]

        paced = build_workload(4, 1, tag=f"{tag}b")
        paced_tracker = CommitTracker()
        await publish_workload(channel, exchange.name, SUBMIT_TYPE, paced, paced_tracker, rate=10.0)
        assert len(set(paced_tracker.published_at.values())) == 4

        received = []
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                received.append(message)
                if len(received) == 74:
                    break
        assert [json.loads(m.body)["input_id"] for m in received] == [
            s.input_id for s in [*burst, *paced]
        ]
        assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in received)
        assert all(m.type == SUBMIT_TYPE for m in received)
        assert len({m.message_id for m in received}) == 74
    finally:
        await connection.close()
