"""``lash-consumer``: run a worker, talk to the service, and administer it.

Service commands go through the broker like any producer (``send``, ``watch``, ``read``,
``dead-letters``); admin commands talk to PostgreSQL directly (``migrate``, ``inspect``,
``vacuum``, ``cancel-input``). Every command reads the same ``LASH_*`` settings as the
worker; ``--namespace`` overrides ``LASH_NAMESPACE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer

from consumer import wire
from consumer.settings import Settings

T = TypeVar("T")

app = typer.Typer(
    name="lash-consumer",
    help="Durable LLM-agent sessions behind RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
)

NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Overrides LASH_NAMESPACE.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print raw JSON instead of text.")]


def _settings(namespace: str | None = None) -> Settings:
    return Settings(namespace=namespace) if namespace else Settings()


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------- run


@app.command()
def run(namespace: NamespaceOpt = None) -> None:
    """Start one worker (migrates the database and declares the topology itself)."""
    from consumer import collector
    from consumer.observability.logs import configure_logging
    from consumer.observability.tracing import configure_tracing, shutdown_tracing

    settings = _settings(namespace)
    configure_logging(settings.log_format, settings.log_level)
    configure_tracing(settings.tracing)
    collector.tune()
    try:
        code = _run(lambda: _serve(settings))
    finally:
        shutdown_tracing()  # flush spans still buffered
    raise typer.Exit(code)


async def _serve(settings: Settings) -> int:
    from consumer import collector
    from consumer.observability.logs import get_logger
    from consumer.worker import Worker

    log = get_logger("consumer.cli")
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        starting = asyncio.create_task(worker.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        elif starting.exception() is not None:
            log.error("worker_start_failed", error=repr(starting.exception()))
            stopped.cancel()
            code = 1
        else:
            collector.freeze_startup_heap()  # what start-up built lives as long as we do
            fatal = asyncio.create_task(worker.wait_fatal())
            await asyncio.wait({stopped, fatal}, return_when=asyncio.FIRST_COMPLETED)
            if fatal.done():
                code = 1
            fatal.cancel()
            stopped.cancel()
    finally:
        await worker.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return code


# --------------------------------------------------------------------------- producer commands


@app.command()
def send(
    session_id: str,
    text: str,
    source_key: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    steer: Annotated[
        str | None, typer.Option(help="Steer this running turn (active-turn ingress).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the turn and print the reply.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 120.0,
    namespace: NamespaceOpt = None,
) -> None:
    """Submit a turn input and print the receipt (with --wait: and the reply)."""
    settings = _settings(namespace)
    code = _run(lambda: _send(settings, session_id, text, source_key, steer, wait, timeout))
    raise typer.Exit(code)


async def _send(
    settings: Settings,
    session_id: str,
    text: str,
    source_key: str | None,
    steer: str | None,
    wait: bool,
    timeout_s: float,
) -> int:
    from consumer.producer import Producer

    async with (
        await Producer.connect(
            settings.amqp_url, settings.namespace, max_deliveries=settings.max_deliveries
        ) as producer,
        producer.observe(session_id) as events,
    ):
        receipt = await producer.submit(
            session_id, text, source_key=source_key, steer_turn_id=steer, timeout_s=timeout_s
        )
        _echo_json(receipt.to_wire())
        if receipt.status not in ("admitted", "duplicate") or receipt.input is None:
            return 1
        if not wait:
            return 0
        try:
            committed = await asyncio.wait_for(
                _wait_for_turn(producer, events, session_id, receipt.input.input_id), timeout_s
            )
        except TimeoutError:
            typer.echo(f"no committed turn for {receipt.input.input_id} within {timeout_s}s")
            return 2
        typer.echo(_reply_text(committed))
        return 0 if committed.get("outcome", {}).get("kind") == "finished" else 3


async def _wait_for_turn(
    producer: Any, events: Any, session_id: str, input_id: str
) -> dict[str, Any]:
    """The ``turn.committed`` event that completed ``input_id``.

    Follows live observations; every few seconds (and first) it also asks ``session.read``
    so a turn committed before the observer was bound, or an event lost in transit, is
    still found.
    """
    after = 0
    while True:
        read = await producer.read(session_id, after_seq=after)
        for event in read.events or []:
            if event.type == "turn.committed" and input_id in event.input_ids:
                return dict(event.model_dump(mode="json"))
            after = max(after, event.seq)
        with contextlib.suppress(TimeoutError):
            while True:
                body = await events.next(timeout_s=3.0)
                if body.get("type") == "turn.committed" and input_id in body.get("input_ids", []):
                    return dict(body)


def _reply_text(committed: dict[str, Any]) -> str:
    outcome = committed.get("outcome", {})
    if outcome.get("kind") == "finished":
        finish = outcome.get("finish", {})
        if "text" in finish:
            return str(finish["text"])
        return json.dumps(finish, ensure_ascii=False)
    assistant = [m["text"] for m in committed.get("messages", []) if m.get("role") == "assistant"]
    stop = outcome.get("stop", "unknown")
    return "\n".join([*assistant, f"[turn stopped: {stop}]"])


def _describe(event: dict[str, Any]) -> str:
    """One human-readable line for an observation event."""
    kind = event.get("type", "?")
    seq = event.get("seq", "?")
    if kind == "turn.activity":
        activity = event.get("activity", {})
        what = activity.get("kind")
        if what == "text_delta":
            return f"      ~ {activity.get('text', '')!r}"
        if what == "tool_call":
            arguments = json.dumps(activity.get("arguments"))
            return f"      ~ tool {activity.get('tool_name')}({arguments})"
        if what == "tool_result":
            ok = "ok" if activity.get("ok") else "error"
            return f"      ~ tool {activity.get('tool_name')} -> {ok}: {activity.get('output', '')}"
        return f"      ~ {what}"
    head = f"#{seq:<5} {kind}"
    if kind == "input.admitted":
        record = event.get("input", {})
        text = " ".join(i.get("text", "") for i in record.get("input", {}).get("items", []))
        return f"{head} {record.get('input_id')}: {text}"
    if kind == "turn.started":
        return f"{head} {event.get('turn_id')} inputs={event.get('input_ids')}"
    if kind == "turn.committed":
        return f"{head} {event.get('turn_id')} -> {_reply_text(event)}"
    if kind in ("input.cancelled", "input.accepted"):
        return f"{head} {event.get('input_ids')}"
    if kind == "session.command_applied":
        return f"{head} {event.get('command', {}).get('kind')}"
    return head


@app.command()
def watch(
    session_id: str,
    after_seq: Annotated[
        int | None, typer.Option(help="First print the durable events after this seq.")
    ] = None,
    live: Annotated[bool, typer.Option(help="Also show live turn.activity events.")] = True,
    as_json: JsonOpt = False,
    namespace: NamespaceOpt = None,
) -> None:
    """Follow a session's observation events, recovering missed ones with session.read."""
    settings = _settings(namespace)
    with contextlib.suppress(KeyboardInterrupt):
        _run(lambda: _watch(settings, session_id, after_seq, live, as_json))


async def _watch(
    settings: Settings, session_id: str, after_seq: int | None, live: bool, as_json: bool
) -> None:
    from consumer.producer import Producer

    def show(event: dict[str, Any]) -> None:
        typer.echo(json.dumps(event, ensure_ascii=False) if as_json else _describe(event))

    async with (
        await Producer.connect(settings.amqp_url, settings.namespace) as producer,
        producer.observe(session_id) as events,
    ):
        last = after_seq
        if after_seq is not None:
            read = await producer.read(session_id, after_seq=after_seq)
            for event in read.events or []:
                show(event.model_dump(mode="json"))
                last = event.seq
        async for body in events:
            seq = body.get("seq")
            if body.get("durable") is False:
                if live:
                    show(body)
                continue
            if not isinstance(seq, int):
                continue
            if last is not None and seq <= last:
                continue  # a redelivery or an event already recovered
            if last is not None and seq > last + 1:
                read = await producer.read(session_id, after_seq=last)
                if read.gap:
                    typer.echo(f"[events after {last} are no longer retained]")
                for event in read.events or []:
                    if event.seq < seq:
                        show(event.model_dump(mode="json"))
            show(body)
            last = seq


@app.command()
def read(session_id: str, as_json: JsonOpt = False, namespace: NamespaceOpt = None) -> None:
    """Print a session's committed transcript (via session.read)."""
    settings = _settings(namespace)
    result = _run(lambda: _read(settings, session_id))
    if as_json:
        _echo_json(result.to_wire())
        return
    for message in result.messages:
        typer.echo(f"[{message.role}] {message.text}")
    if result.running_turn_id:
        typer.echo(f"(turn {result.running_turn_id} is running)")
    for pending in result.pending_inputs:
        typer.echo(f"(pending {pending.input_id}: {pending.input.text()})")


async def _read(settings: Settings, session_id: str) -> wire.SessionReadResult:
    from consumer.producer import Producer

    async with await Producer.connect(settings.amqp_url, settings.namespace) as producer:
        return await producer.read(session_id)


@app.command("dead-letters")
def dead_letters(
    requeue: Annotated[
        bool, typer.Option(help="Republish them to the ingress exchange (and remove them).")
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many messages.")] = 100,
    as_json: JsonOpt = False,
    namespace: NamespaceOpt = None,
) -> None:
    """List dead letters with their reasons; --requeue sends them back to ingress."""
    from consumer.deadletters import list_dead_letters, requeue_dead_letters

    settings = _settings(namespace)
    if requeue:
        count = _run(lambda: requeue_dead_letters(settings, limit))
        typer.echo(f"requeued {count} message(s) to {settings.namespace}.ingress")
        return
    letters = _run(lambda: list_dead_letters(settings, limit))
    if as_json:
        _echo_json([letter.as_dict() for letter in letters])
        return
    if not letters:
        typer.echo("no dead letters")
    for letter in letters:
        typer.echo(
            f"{letter.message_id or '-'}  {letter.routing_key or '-'}  "
            f"{letter.error_code}: {letter.error_message}"
        )
        typer.echo(f"    {letter.preview()}")


# --------------------------------------------------------------------------- admin commands


async def _with_store(settings: Settings, use: Callable[[Any], Awaitable[T]]) -> T:
    from lash_core.store.postgres import PostgresStore

    store = PostgresStore(settings.database_url, pool_size=2)
    await store.start()
    try:
        return await use(store)
    finally:
        await store.close()


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (workers also do this at start)."""
    from lash_core.store.postgres import migrate as run_migrations

    settings = _settings()
    _run(lambda: run_migrations(settings.database_url))
    typer.echo("database schema is up to date")


@app.command()
def inspect(
    session_id: str,
    events: Annotated[int, typer.Option(help="How many of the last events to show.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Lease holder, generation, running turn, pending inputs and last events of a session."""
    settings = _settings()

    async def use(store: Any) -> dict[str, Any]:
        lease = await store.read_lease(session_id)
        view = await store.read_session(session_id)
        page = await store.events_after(session_id, max(0, view.last_seq - events))
        commands = await store.list_commands(session_id, pending_only=True)
        now = await store.now_ms()
        return {
            "session_id": session_id,
            "head_revision": view.head_revision,
            "last_seq": view.last_seq,
            "lease": None
            if lease is None
            else {
                "holder": lease.owner.model_dump(mode="json") if lease.owner else None,
                "generation": lease.fencing_token,
                "live": lease.is_live(now),
                "expires_in_ms": lease.expires_at_ms - now if lease.lease_token else None,
                "running_turn_id": lease.running_turn_id,
                "cancel_requested": lease.cancel_requested,
            },
            "pending_inputs": [p.public().model_dump(mode="json") for p in view.pending_inputs],
            "pending_commands": [
                wire.CommandRecord.of(c).model_dump(mode="json") for c in commands
            ],
            "messages": len(view.messages),
            "last_events": [e.to_wire() for e in page.events],
        }

    info = _run(lambda: _with_store(settings, use))
    if as_json:
        _echo_json(info)
        return
    lease = info["lease"]
    typer.echo(f"session {session_id}: revision {info['head_revision']}, seq {info['last_seq']}")
    if lease is None or lease["holder"] is None:
        generation = lease["generation"] if lease else 0
        typer.echo(f"lease: free (generation {generation})")
    else:
        holder = lease["holder"]
        typer.echo(
            f"lease: {holder['owner_id']}/{holder['incarnation_id']} generation "
            f"{lease['generation']} {'live' if lease['live'] else 'expired'} "
            f"(expires in {lease['expires_in_ms']} ms)"
        )
        typer.echo(f"running turn: {lease['running_turn_id'] or '-'}")
    typer.echo(f"pending inputs: {len(info['pending_inputs'])}")
    for record in info["pending_inputs"]:
        typer.echo(f"  {record['input_id']} [{record['state']}] seq {record['enqueue_seq']}")
    typer.echo(f"pending commands: {len(info['pending_commands'])}")
    typer.echo("last events:")
    for event in info["last_events"]:
        typer.echo("  " + _describe(event))


@app.command()
def vacuum(
    older_than_s: Annotated[
        int | None,
        typer.Option(
            help="Age to remove, for tombstones and events alike (default: each kind's "
            "own retention, LASH_TOMBSTONE_RETENTION_S and LASH_EVENT_RETENTION_S)."
        ),
    ] = None,
    session_id: Annotated[str | None, typer.Option(help="Only this session.")] = None,
) -> None:
    """Delete terminal input/command tombstones and published events past retention."""
    settings = _settings()
    tombstone_s = settings.tombstone_retention_s if older_than_s is None else older_than_s
    event_s = settings.event_retention_s if older_than_s is None else older_than_s

    async def use(store: Any) -> Any:
        return await store.vacuum(
            tombstone_s * 1000, session_id, events_older_than_ms=event_s * 1000
        )

    report = _run(lambda: _with_store(settings, use))
    _echo_json(report.model_dump(mode="json"))


@app.command("cancel-input")
def cancel_input(
    session_id: str,
    targets: Annotated[list[str], typer.Argument(help="Input ids (or source keys).")],
    by_source_key: Annotated[
        bool, typer.Option("--source-key", help="Targets are source keys.")
    ] = False,
    suffix: Annotated[
        bool, typer.Option(help="Cancel the (single) target and every later input.")
    ] = False,
) -> None:
    """Cancel pending inputs directly in the database (atomic, like turn_input.cancel)."""
    from consumer.producer import target

    settings = _settings()
    kind = "source_key" if by_source_key else "input_id"
    chosen = [target(t, kind) for t in targets]
    if suffix and len(chosen) != 1:
        typer.echo("--suffix takes exactly one anchor", err=True)
        raise typer.Exit(2)

    async def use(store: Any) -> list[dict[str, Any]]:
        if suffix:
            result = await store.cancel_input_suffix(session_id, chosen[0])
            if not result.anchor_found:
                return []
            return [r.model_dump(mode="json") for r in result.results]
        results = await store.cancel_inputs(session_id, chosen)
        return [r.model_dump(mode="json") for r in results]

    results = _run(lambda: _with_store(settings, use))
    if suffix and not results:
        typer.echo("anchor not found")
        raise typer.Exit(1)
    for result in results:
        record = result.get("input") or {}
        typer.echo(
            f"{result['target']['kind']}={result['target']['value']}: {result['outcome']}"
            f"{' (' + record['input_id'] + ')' if record else ''}"
        )


# --------------------------------------------------------------------------- bench


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Benchmark the fleet against a raw baseline (see ``lash-consumer bench --help``)."""
    from bench.run import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lash-consumer")


if __name__ == "__main__":
    main()
