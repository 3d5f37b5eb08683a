"""Worker configuration from ``LASH_*`` environment variables (CONTRACT.md "Configuration").

Every field has a working default so ``lash-consumer run`` works on a fresh machine. The
README documents each field; a test compares it with :attr:`Settings.model_fields`, so a
new setting must be documented there too.
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _hostname() -> str:
    return socket.gethostname() or "lash-worker"


#: The least default prefetch, whatever the concurrency.
MIN_DEFAULT_PREFETCH = 256


def default_prefetch(concurrency: int) -> int:
    """The AMQP prefetch of a worker that runs ``concurrency`` sessions at once (unless
    ``LASH_PREFETCH`` says otherwise); the benchmark gives its baseline the same.

    A message is acked as soon as its admission commits, so the prefetch bounds only the
    admission pipeline, never the turns: a deep window lets one admission transaction
    take a large batch, and lets input that queued up behind busy sessions be admitted
    early enough to merge into their next turn (measured: 2 workers, 200 sessions x 5,
    32 -> 256 raised inputs/s by about 30%, with fewer, larger turns)."""
    return max(MIN_DEFAULT_PREFETCH, 2 * concurrency)


class Settings(BaseSettings):
    """One worker's settings. Read once at start; never logged with secrets."""

    model_config = SettingsConfigDict(env_prefix="LASH_", extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    namespace: str = Field(default="lash", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    provider: Literal["echo", "openai"] = "echo"
    echo_delay_ms: int = Field(default=0, ge=0)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    model: str | None = None
    lease_ttl_ms: int = Field(default=30_000, ge=300)
    max_message_bytes: int = Field(default=1_048_576, ge=1)
    concurrency: int = Field(default=16, ge=1)
    prefetch: int = Field(default=0, ge=0)
    max_deliveries: int = Field(default=5, ge=1)
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    sweep_interval_ms: int = Field(default=2_000, ge=10)
    outbox_batch: int = Field(default=200, ge=1)
    outbox_shards: int = Field(default=8, ge=1)
    event_retention_s: int = Field(default=604_800, ge=0)
    tombstone_retention_s: int = Field(default=604_800, ge=0)
    vacuum_interval_s: int = Field(default=3_600, ge=0)
    db_pool_size: int = Field(default=10, ge=1)
    state_cache_sessions: int = Field(default=1024, ge=1)
    state_cache_mib: int = Field(default=8, ge=1)
    owner_id: str = Field(default_factory=_hostname, min_length=1)
    system_prompt: str | None = None
    max_iterations: int = Field(default=16, ge=1)
    tracing: Literal["off", "console", "otlp"] = "off"

    @property
    def effective_prefetch(self) -> int:
        """The AMQP prefetch: explicit, or :func:`default_prefetch` of the concurrency."""
        return self.prefetch if self.prefetch > 0 else default_prefetch(self.concurrency)

    def public(self) -> dict[str, object]:
        """The settings as logged at start: secrets masked, URLs without passwords."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "**********" if value.get_secret_value() else ""
            elif name in {"database_url", "amqp_url"} and isinstance(value, str):
                value = redact_url(value)
            out[name] = value
        return out


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: never log a password embedded in a URL."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
