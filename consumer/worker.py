"""One worker process: store, broker, engine, dispatch, ingress, outbox, health.

:meth:`Worker.start` brings the parts up in dependency order and starts consuming last,
so a message is only taken once everything that handles it runs. :meth:`Worker.shutdown`
is the graceful stop of CONTRACT.md: stop consuming, let running turns finish within
``LASH_SHUTDOWN_GRACE_S`` (then cancel them: they commit as stopped/cancelled), release
leases, flush the outbox, close connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from consumer import broker
from consumer.admission import Admission
from consumer.dispatch import Dispatcher
from consumer.ingress import IngressConsumer
from consumer.observability.health import HealthServer
from consumer.observability.logs import get_logger
from consumer.observability.metrics import InstrumentedProvider
from consumer.observability.tracing import span
from consumer.outbox import ActivityPublisher, OutboxRelay
from consumer.settings import Settings
from consumer.topology import declare
from lash_core.engine import AgentConfig, SessionDriver
from lash_core.engine.state_cache import StateCache
from lash_core.leases import local_process_owner
from lash_core.providers.base import Provider
from lash_core.providers.factory import build_provider
from lash_core.store.base import Store
from lash_core.tools.builtins import default_registry

log = get_logger(__name__)

StoreFactory = Callable[[Settings], Store]

RELAY_TIMER_FACTOR = 2.5
"""The outbox relay's fallback poll and shard retake run every this many sweep intervals."""


def postgres_store(settings: Settings) -> Store:
    from lash_core.store.postgres import PostgresStore

    return PostgresStore(settings.database_url, pool_size=settings.db_pool_size)


def make_provider(settings: Settings) -> Provider:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return build_provider(
        settings.provider,
        echo_delay_ms=settings.echo_delay_ms,
        openai_base_url=settings.openai_base_url,
        openai_api_key=key,
        model=settings.model,
    )


def state_cache(settings: Settings) -> StateCache[Any]:
    """The driver's committed-state cache, within the bounds the settings give."""
    return StateCache(
        max_sessions=settings.state_cache_sessions,
        max_bytes=settings.state_cache_mib * 1024 * 1024,
    )


class Worker:
    """A running worker. Any number may share one database and broker."""

    def __init__(self, settings: Settings, *, store_factory: StoreFactory = postgres_store) -> None:
        self.settings = settings
        self._store_factory = store_factory
        self.incarnation_id = uuid.uuid4().hex
        self.store: Store | None = None
        self.connection: AbstractRobustConnection | None = None
        self.dispatcher: Dispatcher | None = None
        self.relay: OutboxRelay | None = None
        self.ingress: IngressConsumer | None = None
        self.driver: SessionDriver | None = None
        self.health: HealthServer | None = None
        self._provider: Provider | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._started = False
        self._fatal: asyncio.Future[BaseException] | None = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        s = self.settings
        log.info("worker_starting", incarnation_id=self.incarnation_id, settings=s.public())
        self._fatal = asyncio.get_running_loop().create_future()
        if s.http_port:
            self.health = HealthServer(s.http_port, self.ready)
            await self.health.start()

        store = self._store_factory(s)
        self.store = store
        await store.start()  # connects and migrates under an advisory lock

        self.connection = await broker.connect(s.amqp_url)
        consume = await broker.open_channel(self.connection)
        await consume.set_qos(prefetch_count=s.effective_prefetch)
        topology = await declare(consume, s.namespace, s.max_deliveries)
        replies = await broker.open_channel(self.connection)
        outbox_channel = await broker.open_channel(self.connection)
        activity_channel = await broker.open_channel(self.connection, publisher_confirms=False)
        observations = await outbox_channel.get_exchange(topology.names.observations)
        live = await activity_channel.get_exchange(topology.names.observations)

        self._provider = InstrumentedProvider(make_provider(s))
        agent = AgentConfig(
            provider=self._provider,
            tools=default_registry(),
            system_prompt=s.system_prompt,
            max_iterations=s.max_iterations,
            span=span,
        )
        owner = local_process_owner(s.owner_id, self.incarnation_id)
        self.driver = SessionDriver(
            store,
            agent,
            owner,
            lease_ttl_ms=s.lease_ttl_ms,
            on_activity=ActivityPublisher(live),
            state_cache=state_cache(s),
        )
        self.relay = OutboxRelay(
            store,
            observations,
            database_url=s.database_url,
            namespace=s.namespace,
            shards=s.outbox_shards,
            batch=s.outbox_batch,
            # Notifications and local commits wake the relay; polling and retaking shards
            # are fallbacks, so they run on a slower timer than the dispatch sweep.
            poll_interval_s=s.sweep_interval_ms * RELAY_TIMER_FACTOR / 1000,
            retake_interval_s=s.sweep_interval_ms * RELAY_TIMER_FACTOR / 1000,
        )
        # The store hands the events it commits to this relay when it publishes their
        # session, and otherwise announces them (carried) to the relay that does: no other
        # wake-up of the relay is needed.
        store.set_local_publisher(self.relay)
        self.dispatcher = Dispatcher(
            self.driver,
            store,
            concurrency=s.concurrency,
            sweep_interval_s=s.sweep_interval_ms / 1000,
            runs_here=self.relay.publishes,
        )
        admission = Admission(
            store,
            on_work=self.dispatcher.kick,
            cancel_local=self.dispatcher.cancel_local,
            owner=owner,
        )
        self.ingress = IngressConsumer(
            admission,
            topology,
            consume,
            replies,
            max_message_bytes=s.max_message_bytes,
            max_deliveries=s.max_deliveries,
            # At most the prefetch can be waiting, so that is the largest useful batch.
            max_batch=s.effective_prefetch,
        )

        self._spawn(self.relay.run(), "outbox")
        self._spawn(self._notification_pump(), "notifications")
        self._spawn(self.dispatcher.run_sweeper(), "sweeper")
        if s.vacuum_interval_s > 0:
            self._spawn(self._vacuum_loop(), "vacuum")
        await self.ingress.start()
        self._started = True
        log.info(
            "worker_started",
            namespace=s.namespace,
            owner_id=s.owner_id,
            concurrency=s.concurrency,
            prefetch=s.effective_prefetch,
        )

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                log.exception("worker_task_crashed", task=name)
                if self._fatal is not None and not self._fatal.done():
                    self._fatal.set_result(exc)

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def _notification_pump(self) -> None:
        assert self.store is not None and self.dispatcher is not None and self.relay is not None
        while True:
            try:
                async for note in self.store.notifications():
                    if note.kind == "events":
                        self.relay.on_notification(note)
                    else:
                        self.dispatcher.on_notification(note)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notifications_lost", error=f"{type(exc).__name__}: {exc}")
            # The stream ended or failed: wake-ups may be lost, so sweep and poll now.
            self.dispatcher.sweep_soon()
            self.relay.wake()
            await asyncio.sleep(1.0)

    async def _vacuum_loop(self) -> None:
        assert self.store is not None
        s = self.settings
        while True:
            await asyncio.sleep(s.vacuum_interval_s)
            try:
                report = await self.store.vacuum(
                    s.tombstone_retention_s * 1000,
                    events_older_than_ms=s.event_retention_s * 1000,
                )
                log.info("vacuum", **report.model_dump())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("vacuum_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ health

    async def ready(self) -> tuple[bool, dict[str, str]]:
        """Readiness: database and broker connected, ingress consuming, started, not draining."""
        details: dict[str, str] = {}
        ok = self._started and not self._draining
        details["worker"] = (
            "draining" if self._draining else ("running" if self._started else "starting")
        )
        if self.store is None:
            details["database"] = "connecting"
            ok = False
        else:
            try:
                await asyncio.wait_for(self.store.now_ms(), 2.0)
                details["database"] = "ok"
            except Exception as exc:
                details["database"] = f"error: {type(exc).__name__}"
                ok = False
        broker_ok = self.connection is not None and not self.connection.is_closed
        details["broker"] = "ok" if broker_ok else "disconnected"
        consuming = self.ingress is not None and await self.ingress.consuming()
        details["ingress"] = "consuming" if consuming else "not consuming"
        return ok and broker_ok and consuming, details

    # ------------------------------------------------------------------ stop

    async def wait_fatal(self) -> BaseException:
        """Resolves if a background task crashes (the worker should then exit non-zero)."""
        assert self._fatal is not None
        return await self._fatal

    async def shutdown(self) -> None:
        """Graceful stop (idempotent and safe after a partial start)."""
        if self._draining:
            return
        self._draining = True
        s = self.settings
        log.info("worker_stopping", grace_s=s.shutdown_grace_s, **self._dispatch_counts())
        if self.ingress is not None:
            await self.ingress.stop_consuming()
            await self.ingress.drain(10.0)
        if self.dispatcher is not None:
            await self.dispatcher.shutdown(s.shutdown_grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.relay is not None:
            await self.relay.flush(10.0)
            await self.relay.close()
        await self._close_resources()
        log.info("worker_stopped")

    def _dispatch_counts(self) -> dict[str, int]:
        """What this worker's dispatcher did, for the stop log (work-check costs show here)."""
        d = self.dispatcher
        if d is None:
            return {}
        return {
            "drains": d.drains,
            "idle_drains": d.idle_drains,
            "busy_drains": d.busy_drains,
            "turns": d.turns,
            "sweeps": d.sweeps,
            "checks": d.checks,
            "probes": d.probes,
        }

    async def _close_resources(self) -> None:
        closers: list[Any] = []
        if self.connection is not None:
            closers.append(self.connection.close())
        if self._provider is not None:
            closers.append(self._provider.aclose())
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.health is not None:
            with contextlib.suppress(Exception):
                await self.health.stop()
