"""Structured logging: one pipeline for our own log lines and every library's.

Operators read these logs with machines (JSON lines on stdout, one object per line) and
sometimes with eyes (a coloured console renderer when stdout is a terminal). Both come out
of the same structlog processor chain, and the stdlib loggers of aio-pika, aiormq,
SQLAlchemy, alembic and httpx are routed through it too (``ProcessorFormatter``), so every
line has the same keys: ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event``,
any context bound with :func:`structlog.contextvars.bind_contextvars` (``session_id``,
``turn_id``, ``input_id``, ``lease_generation`` ...) and, for errors, ``exception``.

Secrets never reach the output: a redaction processor runs last before rendering, on
every line from every source, and masks values of secret-looking keys and credentials
embedded in URLs (``amqp://user:pass@host`` becomes ``amqp://user:***@host``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "configure_logging", "get_logger", "redact_secrets", "redact_text"]

REDACTED = "***"

# A key is secret when its last word (split on ``_``/``-``/``.``) names a secret, or it is
# one of a few well-known header names. Matching the last word keeps counters such as
# ``input_tokens`` and ``max_output_tokens`` visible while masking ``api_key``,
# ``openai_api_key``, ``access_token``, ``client_secret`` and ``Authorization``.
_SECRET_KEY = re.compile(
    r"(?:^|[_\-.])(?:password|passwd|pwd|secret|token|api[_\-]?key|apikey|authorization"
    r"|credentials?|cookie|set[_\-]cookie|private[_\-]?key|x[_\-]api[_\-]key)$",
    re.IGNORECASE,
)
# ``scheme://user:password@`` -> ``scheme://user:***@`` (any scheme: amqp, amqps,
# postgresql, postgresql+psycopg, redis, https ...).
_URL_CREDENTIALS = re.compile(
    r"(?P<prefix>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*):(?P<password>[^\s@/]*)@"
)
_BEARER = re.compile(r"(?P<prefix>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/\-]+=*", re.IGNORECASE)
# OpenAI-style API keys that slipped into free text.
_API_KEY_TEXT = re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")

# Libraries that log every connection, channel or statement at INFO. Their warnings and
# errors matter; their chatter drowns the service's own lines unless we are debugging.
_NOISY_LOGGERS = (
    "aio_pika",
    "aiormq",
    "pamqp",
    "sqlalchemy",
    "sqlalchemy.engine",
    "sqlalchemy.pool",
    "httpx",
    "httpcore",
    "asyncio",
)
_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
_FORMATS = ("auto", "json", "console")
_HANDLER_NAME = "lash-consumer"


# What every credential pattern above needs in the text: most values (ids, names,
# counts) have none of it, and one search is far cheaper than the substitutions.
_MAY_HOLD_CREDENTIAL = re.compile(r"://|bearer|basic|sk-", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Mask credentials inside free text: URL passwords, bearer tokens, API keys."""
    if not _MAY_HOLD_CREDENTIAL.search(text):
        return text
    if "://" in text:
        text = _URL_CREDENTIALS.sub(rf"\g<prefix>:{REDACTED}@", text)
    text = _BEARER.sub(rf"\g<prefix>{REDACTED}", text)
    return _API_KEY_TEXT.sub(REDACTED, text)


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    """Whether values under ``key`` are masked whole (log keys are a small, fixed set)."""
    return _SECRET_KEY.search(key) is not None


def _redact_value(key: object, value: Any, depth: int = 0) -> Any:
    if isinstance(key, str) and _secret_key(key) and value not in (None, ""):
        return REDACTED
    if depth > 8:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(None, v, depth + 1) for v in value]
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-looking keys and credentials inside strings."""
    for key in list(event_dict):
        if key.startswith("_"):  # structlog's own metadata (_record, _from_structlog)
            continue
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes to whatever ``sys.stdout`` is at emit time.

    Resolving the stream late keeps output correct when stdout is replaced after logging
    is configured (pytest's capture, a daemon that redirects its streams).
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        return None


def _json_line(event: EventDict, **kwargs: Any) -> str:
    """One JSON line with orjson (several times faster than ``json.dumps`` for a log
    line); values it cannot serialise go through structlog's fallback (``repr``)."""
    return orjson.dumps(event, default=kwargs.get("default")).decode()


def _use_console(fmt: str) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}") from None


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog and stdlib logging to stdout through one processor chain.

    ``fmt`` is ``auto`` (console renderer on a TTY, JSON lines otherwise), ``json`` or
    ``console``. ``level`` is a level name (``debug`` also lets the noisy driver loggers
    through). Safe to call again: it replaces the handler it installed before.
    """
    fmt = fmt.strip().lower()
    if fmt not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {list(_FORMATS)}")
    numeric_level = _parse_level(level)
    console = _use_console(fmt)

    # Applied to stdlib records before the shared tail (structlog's own events get the
    # same steps from the structlog chain below).
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        # Unnamed loggers are named after the calling module, not after this one.
        logger_factory=structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__]),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    handler = _StdoutHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        # Replace our previous handler and any default one (basicConfig, lastResort);
        # a test harness's capture handlers are left alone.
        if existing.get_name() == _HANDLER_NAME or type(existing) is logging.StreamHandler:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    library_level = numeric_level if numeric_level <= logging.DEBUG else logging.WARNING
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(library_level, numeric_level))
    # Migrations are rare and worth seeing ("Running upgrade ..."), at the service level.
    logging.getLogger("alembic").setLevel(numeric_level)
    logging.captureWarnings(True)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger; ``name`` becomes the ``logger`` key (module name if omitted)."""
    if name is None:
        unnamed: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger()
        return unnamed
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
