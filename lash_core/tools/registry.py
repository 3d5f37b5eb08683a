"""The tool registry: what tools a session offers and how a model's tool call is run.

A tool is an async callable taking one pydantic model (its arguments). The registry derives
the JSON Schema offered to the model from that model, validates the model's arguments
against it, and turns every failure - unknown tool, invalid arguments, an exception in the
tool, a timeout - into a typed :class:`ToolResult`, so a misbehaving tool or model ends up
in the transcript rather than crashing the turn. Only cancellation propagates: a cancelled
turn must stop its tools.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from pydantic import BaseModel, ValidationError

from lash_core._model import Frozen
from lash_core.errors import InvalidRequest, ToolError
from lash_core.providers.base import RAW_ARGUMENTS_KEY, ToolSpec
from lash_core.transcript import ToolCall

ToolErrorKind = Literal["unknown_tool", "invalid_arguments", "tool_error", "timeout"]
ToolFunc = Callable[[Any], Awaitable[Any]]
F = TypeVar("F", bound=ToolFunc)

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""The tool names every OpenAI-compatible API accepts."""

_MAX_ERROR_CHARS = 2000


class ToolResult(Frozen):
    """The outcome of one tool call. ``ok`` is false exactly when ``error_kind`` is set."""

    call_id: str
    tool_name: str
    ok: bool
    output: str
    error_kind: ToolErrorKind | None = None


@dataclass(frozen=True)
class RegisteredTool:
    """A tool as the registry holds it."""

    name: str
    description: str
    args_model: type[BaseModel]
    func: ToolFunc

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.name,
            description=self.description,
            parameters=self.args_model.model_json_schema(),
        )


class ToolRegistry:
    """Named async tools with schemas, validation and typed results."""

    def __init__(self, tools: Iterable[RegisteredTool] = ()) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        # Built on first use and dropped on every registration: generating the JSON
        # Schemas is pydantic work that would otherwise repeat on every model call.
        self._specs: tuple[ToolSpec, ...] | None = None
        self._hash: str | None = None
        for tool in tools:
            self._add(tool)

    # -- registration -------------------------------------------------------------------

    def register(
        self,
        func: ToolFunc,
        *,
        name: str | None = None,
        description: str | None = None,
        args_model: type[BaseModel] | None = None,
    ) -> RegisteredTool:
        """Add ``func`` as a tool.

        The name defaults to the function's ``__name__``, the description to its docstring,
        and the argument model to the annotation of its single parameter (pass
        ``args_model`` when that annotation cannot be resolved, e.g. a model defined inside
        a function under ``from __future__ import annotations``). Raises
        :class:`InvalidRequest` for a sync function, a missing or non-pydantic argument
        annotation, an invalid name or a name already registered.
        """
        if not _is_async_callable(func):
            raise InvalidRequest(f"tool {func!r} must be an async function")
        tool_name = name or str(getattr(func, "__name__", ""))
        model = args_model or _argument_model(func)
        text = description if description is not None else (inspect.getdoc(func) or "")
        tool = RegisteredTool(name=tool_name, description=text, args_model=model, func=func)
        self._add(tool)
        return tool

    @overload
    def tool(self, func: F, /) -> F: ...

    @overload
    def tool(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        args_model: type[BaseModel] | None = None,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        func: ToolFunc | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        args_model: type[BaseModel] | None = None,
    ) -> Any:
        """Decorator form of :meth:`register`: ``@registry.tool`` or ``@registry.tool(...)``.

        Returns the function unchanged, so it stays directly callable.
        """

        def decorate(target: ToolFunc) -> ToolFunc:
            self.register(target, name=name, description=description, args_model=args_model)
            return target

        if func is not None:
            return decorate(func)
        return decorate

    def _add(self, tool: RegisteredTool) -> None:
        if not TOOL_NAME.match(tool.name):
            raise InvalidRequest(f"invalid tool name {tool.name!r}: use 1-64 of [A-Za-z0-9_-]")
        if tool.name in self._tools:
            raise InvalidRequest(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        self._specs = None
        self._hash = None

    # -- catalog ------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    def get(self, name: str) -> RegisteredTool | None:
        return self._tools.get(name)

    def specs(self) -> list[ToolSpec]:
        """The tools as offered to a model, in registration order (cached until the next
        registration; the specs are frozen models shared between calls)."""
        if self._specs is None:
            self._specs = tuple(tool.spec() for tool in self._tools.values())
        return list(self._specs)

    def catalog_hash(self) -> str:
        """A stable fingerprint of the catalog: SHA-256 of the canonical JSON of the specs.

        Independent of registration order and of dict key order, so two workers with the
        same tools agree, and any change of a name, description or schema changes it.
        Cached with the specs.
        """
        if self._hash is None:
            specs = sorted((s.model_dump(mode="json") for s in self.specs()), key=_by_name)
            canonical = json.dumps(specs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._hash

    # -- execution ----------------------------------------------------------------------

    async def call(self, call: ToolCall, *, timeout_s: float | None = None) -> ToolResult:
        """Run one tool call. Every failure is a :class:`ToolResult`; cancellation propagates."""
        tool = self._tools.get(call.name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return _failure(
                call, "unknown_tool", f"unknown tool {call.name!r} (available: {known})"
            )
        arguments = _validate(tool, call)
        if isinstance(arguments, ToolResult):
            return arguments
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                value = await tool.func(arguments)
        except TimeoutError as exc:
            if deadline.expired():
                return _failure(call, "timeout", f"tool {call.name!r} timed out after {timeout_s}s")
            return _failure(call, "tool_error", _describe(exc))
        except ToolError as exc:
            return _failure(call, "tool_error", str(exc) or type(exc).__name__)
        except Exception as exc:
            return _failure(call, "tool_error", _describe(exc))
        try:
            output = render_output(value)
        except (TypeError, ValueError) as exc:
            return _failure(call, "tool_error", f"tool returned an unserialisable value: {exc}")
        return ToolResult(call_id=call.id, tool_name=call.name, ok=True, output=output)

    async def call_many(
        self, calls: Sequence[ToolCall], *, timeout_s: float | None = None
    ) -> list[ToolResult]:
        """Run calls concurrently; results in the order of ``calls``.

        ``asyncio.TaskGroup`` semantics: if the caller is cancelled, every call still
        running is cancelled and awaited before the cancellation propagates.
        """
        if not calls:
            return []
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.call(c, timeout_s=timeout_s)) for c in calls]
        return [task.result() for task in tasks]


def render_output(value: Any) -> str:
    """A tool's return value as transcript text: strings as is, models and data as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, ensure_ascii=False, default=str)


def _validate(tool: RegisteredTool, call: ToolCall) -> BaseModel | ToolResult:
    raw = call.arguments.get(RAW_ARGUMENTS_KEY)
    if (
        set(call.arguments) == {RAW_ARGUMENTS_KEY}
        and isinstance(raw, str)
        and RAW_ARGUMENTS_KEY not in tool.args_model.model_fields
    ):
        return _failure(
            call, "invalid_arguments", f"arguments are not a JSON object: {raw[:_MAX_ERROR_CHARS]}"
        )
    try:
        return tool.args_model.model_validate(call.arguments)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        return _failure(call, "invalid_arguments", f"invalid arguments for {tool.name}: {problems}")


def _failure(call: ToolCall, kind: ToolErrorKind, message: str) -> ToolResult:
    return ToolResult(
        call_id=call.id,
        tool_name=call.name,
        ok=False,
        output=message[:_MAX_ERROR_CHARS],
        error_kind=kind,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _by_name(spec: dict[str, Any]) -> str:
    return str(spec["name"])


def _is_async_callable(func: object) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _argument_model(func: Callable[..., Any]) -> type[BaseModel]:
    """The pydantic model annotating the single parameter of ``func``."""
    target = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) != 1:
        raise InvalidRequest(
            f"tool {func!r} must take exactly one argument (a pydantic model), not {len(params)}"
        )
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:
        raise InvalidRequest(
            f"cannot resolve the argument annotation of tool {func!r} ({exc}); define the "
            "model at module level or pass args_model="
        ) from exc
    annotation = hints.get(params[0].name)
    if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
        raise InvalidRequest(
            f"the argument of tool {func!r} must be annotated with a pydantic model, "
            f"not {annotation!r}"
        )
    return annotation
