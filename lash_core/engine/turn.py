"""One turn: model rounds, concurrent tool calls and steering checkpoints.

The runner produces the turn's messages and outcome; it never commits (the driver does,
so the commit, its retries and the lease release live in one place). Every way a turn can
end is an outcome the user can see, except losing the lease: then nothing may be
committed and the runner says so.

Interruption is cooperative and prompt: each model call and each batch of tool calls runs
as its own task raced against the turn's cancel flag and the lease guard's ``lost`` flag,
so a cancel lands while a response is still streaming. Store calls (checkpoint claims) are
never interrupted half-way, so a claim taken is always a claim known.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from lash_core.claims import TurnInputClaim
from lash_core.clock import Clock, IdFactory
from lash_core.engine.agent import AgentConfig, ToolOutcome
from lash_core.engine.context import build_context
from lash_core.engine.lease_guard import LeaseGuard
from lash_core.errors import LeaseLost, ProviderError, Superseded
from lash_core.events import (
    Activity,
    CheckpointReached,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnActivity,
)
from lash_core.inputs import CheckpointKind, PendingTurnInput
from lash_core.leases import LeaseOwner
from lash_core.outcomes import AssistantMessageFinish, Finished, Stopped, TurnOutcome, Usage
from lash_core.providers.base import ModelDone, ModelRequest, TextChunk, ToolCallRequest
from lash_core.store.base import MAX_CLAIM_INPUTS, Store
from lash_core.transcript import MessageNode, Role, ToolCall, ingress_message_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

ActivitySink = Callable[[TurnActivity], Awaitable[None]]


class TurnControl:
    """The cancel flag of one running turn (set by ``SessionDriver.cancel`` or a renewal)."""

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.event = asyncio.Event()
        self.reason: str | None = None

    def cancel(self, reason: str | None = None) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


class _Interrupt(Exception):
    def __init__(self, kind: Literal["cancelled", "lease_lost"], reason: str | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.reason = reason


@dataclass
class TurnContext:
    """Where the turn starts: the committed active path and the claimed inputs."""

    session_id: str
    turn_id: str
    base_nodes: list[MessageNode]
    leaf_node_id: str | None
    inputs: list[PendingTurnInput]
    seq: int = 0
    revision: int = 0


@dataclass
class TurnOutput:
    """What a turn produced. ``lease_lost``: commit nothing, abandon ``checkpoint_claims``.
    ``task_cancelled``: the runner's task itself was cancelled; re-raise after committing."""

    nodes: list[MessageNode]
    outcome: TurnOutcome
    usage: Usage
    checkpoint_claims: list[TurnInputClaim] = field(default_factory=list)
    lease_lost: bool = False
    task_cancelled: bool = False


class TurnRunner:
    def __init__(
        self,
        *,
        store: Store,
        agent: AgentConfig,
        owner: LeaseOwner,
        guard: LeaseGuard,
        control: TurnControl,
        context: TurnContext,
        ids: IdFactory,
        clock: Clock,
        sink: ActivitySink | None = None,
    ) -> None:
        self._store = store
        self._agent = agent
        self._owner = owner
        self._guard = guard
        self._control = control
        self._ctx = context
        self._ids = ids
        self._clock = clock
        self._sink = sink
        self._nodes: list[MessageNode] = []
        self._usage = Usage()
        self._claims: list[TurnInputClaim] = []
        self._partial_text: list[str] = []
        self._seq = context.seq
        self._rounds = 0
        self._outcome: TurnOutcome | None = None
        #: The steering checkpoint the turn ended at without checking it (the final
        #: commit checks it: ``RuntimeCommit.steering_checkpoint``), or ``None``.
        self.final_checkpoint: CheckpointKind | None = None

    # ------------------------------------------------------------------ public

    async def run(self) -> TurnOutput:
        """Run the turn to its end. A turn that finishes leaves its last steering
        checkpoint to the final commit (:attr:`final_checkpoint`), which checks it under
        the lease row lock; if steering input is pending there, :meth:`resume` goes on."""
        for rec in self._ctx.inputs:
            self._append_user(rec)
        return await self._finish(self._loop())

    async def resume(self) -> TurnOutput:
        """Go on after the final commit found steering input pending at
        :attr:`final_checkpoint` (:class:`~lash_core.errors.SteeringPending`): claim it and
        continue the turn. If nothing could be claimed after all (cancelled meanwhile, or
        the claim failed), the turn ends as it was, and its next final commit defers what
        is left to the next turn rather than checking again."""
        return await self._finish(self._resume())

    async def _finish(self, body: Awaitable[TurnOutcome]) -> TurnOutput:
        task_cancelled = False
        outcome: TurnOutcome
        # Set by the loop only as it returns a finished outcome: any other end has none.
        self.final_checkpoint = None
        try:
            outcome = await body
        except _Interrupt as it:
            if it.kind == "lease_lost":
                return self._lost()
            outcome = Stopped(stop="cancelled", message=it.reason)
        except (LeaseLost, Superseded):
            return self._lost()
        except asyncio.CancelledError:
            # Finish the turn (the driver commits it, then re-raises): the cancel request
            # is consumed here so the commit's own awaits and timeouts behave normally.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            task_cancelled = True
            outcome = Stopped(stop="cancelled", message="turn task cancelled")
        except ProviderError as exc:
            outcome = Stopped(stop="provider_error", message=str(exc))
        except Exception as exc:
            log.exception("turn_runtime_error", session_id=self._ctx.session_id)
            outcome = Stopped(stop="runtime_error", message=f"{type(exc).__name__}: {exc}")
        if self._guard.is_lost:
            return self._lost()
        self._flush_partial_text()
        self._answer_open_tool_calls()
        self._outcome = outcome
        return TurnOutput(
            nodes=self._nodes,
            outcome=outcome,
            usage=self._usage,
            checkpoint_claims=self._claims,
            task_cancelled=task_cancelled,
        )

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> TurnOutcome:
        while self._rounds < self._agent.max_iterations:
            self._rounds += 1
            self._check()
            text, calls = await self._step(self._model_call(self._request()))
            self._partial_text = []
            self._append("assistant", text=text, tool_calls=calls)
            if calls:
                results = await self._step(self._run_tools(calls))
                self._append_tool_results(calls, results)
                await self._checkpoint("after_work")
                continue
            # The ``before_completion`` checkpoint is the final commit's to check.
            self.final_checkpoint = "before_completion"
            return Finished(finish=AssistantMessageFinish(text=text))
        return Stopped(stop="max_turns", message=f"{self._agent.max_iterations} model calls")

    async def _resume(self) -> TurnOutcome:
        finished = self._outcome
        assert finished is not None, "resume() follows run()"
        if await self._checkpoint("before_completion", probe=False):
            return await self._loop()
        return finished

    def _request(self) -> ModelRequest:
        provider = self._agent.provider
        return ModelRequest(
            model=provider.model,
            messages=build_context(
                self._agent.system_prompt, [*self._ctx.base_nodes, *self._nodes]
            ),
            tools=self._agent.tools.specs(),
        )

    async def _model_call(self, request: ModelRequest) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        with self._agent.span(
            "lash.model_call",
            session_id=self._ctx.session_id,
            turn_id=self._ctx.turn_id,
            provider=self._agent.provider.provider_id,
        ):
            async for event in self._agent.provider.stream(request):
                if isinstance(event, TextChunk):
                    if event.text:
                        self._partial_text.append(event.text)
                        await self._emit(TextDelta(text=event.text))
                elif isinstance(event, ToolCallRequest):
                    calls.append(event.call)
                elif isinstance(event, ModelDone):
                    self._usage = self._usage + event.usage
        return "".join(self._partial_text), calls

    async def _run_tools(self, calls: list[ToolCall]) -> dict[str, ToolOutcome]:
        for call in calls:
            await self._emit(
                ToolCallStarted(call_id=call.id, tool_name=call.name, arguments=call.arguments)
            )
        with self._agent.span(
            "lash.tool_call",
            session_id=self._ctx.session_id,
            turn_id=self._ctx.turn_id,
            tools=",".join(call.name for call in calls),
            calls=len(calls),
        ):
            results = await self._agent.tools.call_many(calls, timeout_s=self._agent.tool_timeout_s)
        by_id = {r.call_id: r for r in results}
        for call in calls:
            result = by_id.get(call.id)
            await self._emit(
                ToolCallFinished(
                    call_id=call.id,
                    tool_name=call.name,
                    ok=bool(result and result.ok),
                    output=result.output if result else "error: no result",
                )
            )
        return by_id

    async def _checkpoint(self, kind: CheckpointKind, *, probe: bool = True) -> bool:
        """Take steering input admitted at this checkpoint; True if any was accepted.
        ``probe``: ask whether there is any first (a claim costs a transaction)."""
        self._check()
        ctx = self._ctx
        try:
            if probe and not await self._store.has_active_input(ctx.session_id, ctx.turn_id, kind):
                return False
            claim = await self._store.claim_active_turn_inputs(
                self._guard.fence, self._owner, ctx.turn_id, kind, MAX_CLAIM_INPUTS
            )
        except (LeaseLost, Superseded) as exc:
            raise _Interrupt("lease_lost", str(exc)) from exc
        except Exception:
            # The input stays pending and is deferred to the next turn by the final commit.
            log.warning("checkpoint_claim_failed", session_id=ctx.session_id, exc_info=True)
            return False
        if claim is None or not claim.inputs:
            return False
        self._claims.append(claim)
        self._seq += 1  # the store appended ``input.accepted``
        for rec in claim.inputs:
            self._append_user(rec)
        await self._emit(
            CheckpointReached(
                checkpoint=kind, accepted_input_ids=[r.input_id for r in claim.inputs]
            )
        )
        return True

    # ------------------------------------------------------------------ interruption

    def _check(self) -> None:
        if self._guard.is_lost:
            raise _Interrupt("lease_lost", self._guard.lost_reason)
        if self._control.cancelled:
            raise _Interrupt("cancelled", self._control.reason)

    async def _step(self, work: Awaitable[T]) -> T:
        """Run ``work`` as a task that a cancel or a lost lease interrupts at once."""
        self._check()
        task = asyncio.ensure_future(work)
        watchers = [
            asyncio.ensure_future(self._control.event.wait()),
            asyncio.ensure_future(self._guard.lost.wait()),
        ]
        try:
            await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers:
                w.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            self._check()
            raise asyncio.CancelledError
        return task.result()

    # ------------------------------------------------------------------ transcript

    def _append(self, role: Role, **fields: object) -> MessageNode:
        parent = self._nodes[-1].node_id if self._nodes else self._ctx.leaf_node_id
        node = MessageNode.model_validate(
            {
                "node_id": fields.pop("node_id", None) or self._ids.new_id("m_"),
                "parent_node_id": parent,
                "turn_id": self._ctx.turn_id,
                "role": role,
                "created_at_ms": self._clock.now_ms(),
                **fields,
            }
        )
        self._nodes.append(node)
        return node

    def _append_user(self, rec: PendingTurnInput) -> None:
        self._append(
            "user",
            node_id=ingress_message_id(rec.input_id),
            text=rec.input.text(),
            input_ids=[rec.input_id],
        )

    def _append_tool_results(
        self, calls: Sequence[ToolCall], results: dict[str, ToolOutcome]
    ) -> None:
        for call in calls:
            result = results.get(call.id)
            self._append(
                "tool",
                text=result.output if result else "error: no result",
                tool_call_id=call.id,
                tool_name=call.name,
                is_error=not (result and result.ok),
            )

    def _flush_partial_text(self) -> None:
        """Keep what was streamed of an interrupted answer: the user saw it."""
        if self._partial_text:
            self._append("assistant", text="".join(self._partial_text))
            self._partial_text = []

    def _answer_open_tool_calls(self) -> None:
        """Tool calls without a result (interrupted) get an error result, so the committed
        transcript never has an unanswered call."""
        answered = {n.tool_call_id for n in self._nodes if n.role == "tool"}
        for node in list(self._nodes):
            for call in node.tool_calls:
                if call.id not in answered:
                    self._append(
                        "tool",
                        text="error: interrupted before the tool finished",
                        tool_call_id=call.id,
                        tool_name=call.name,
                        is_error=True,
                    )

    def _lost(self) -> TurnOutput:
        return TurnOutput(
            nodes=self._nodes,
            outcome=Stopped(stop="runtime_error", message="session execution lease lost"),
            usage=self._usage,
            checkpoint_claims=self._claims,
            lease_lost=True,
        )

    async def _emit(self, activity: Activity) -> None:
        if self._sink is None:
            return
        event = TurnActivity(
            session_id=self._ctx.session_id,
            seq=self._seq,
            revision=self._ctx.revision,
            turn_id=self._ctx.turn_id,
            activity=activity,
        )
        try:
            await self._sink(event)
        except Exception:
            log.warning("activity_sink_failed", session_id=self._ctx.session_id, exc_info=True)
