"""Builds the configured provider from settings (``LASH_PROVIDER`` and friends).

The one place that maps a provider name to a class, so the service, the CLI and tests
agree on what ``echo`` and ``openai`` mean and on what each requires.
"""

from __future__ import annotations

from lash_core.errors import InvalidRequest
from lash_core.providers.base import Provider
from lash_core.providers.echo import EchoProvider
from lash_core.providers.openai import OpenAIProvider

PROVIDER_NAMES = ("echo", "openai")


def build_provider(
    name: str,
    *,
    echo_delay_ms: int = 0,
    openai_base_url: str | None = None,
    openai_api_key: str | None = None,
    model: str | None = None,
) -> Provider:
    """The provider called ``name``.

    Raises :class:`InvalidRequest` for an unknown name, a negative echo delay, or an
    ``openai`` provider without a base URL or model (there is no sensible default for
    either, and failing at start beats failing on the first turn).
    """
    key = name.strip().lower()
    if key == "echo":
        if echo_delay_ms < 0:
            raise InvalidRequest(f"echo delay must not be negative (got {echo_delay_ms})")
        return EchoProvider(delay_ms=echo_delay_ms, model=model or "echo")
    if key == "openai":
        if not openai_base_url or not model:
            missing = [
                setting
                for setting, value in (
                    ("LASH_OPENAI_BASE_URL", openai_base_url),
                    ("LASH_MODEL", model),
                )
                if not value
            ]
            raise InvalidRequest(f"the openai provider needs {' and '.join(missing)}")
        return OpenAIProvider(openai_base_url, openai_api_key, model)
    raise InvalidRequest(f"unknown provider {name!r}; expected one of: {', '.join(PROVIDER_NAMES)}")
