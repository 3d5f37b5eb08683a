"""Building the configured provider by name."""

from __future__ import annotations

import pytest

from lash_core.errors import InvalidRequest
from lash_core.providers.echo import EchoProvider
from lash_core.providers.factory import build_provider
from lash_core.providers.openai import OpenAIProvider


async def test_echo_is_built_with_delay_and_model() -> None:
    provider = build_provider("echo", echo_delay_ms=25)
    assert isinstance(provider, EchoProvider)
    assert provider.provider_id == "echo"
    assert provider.model == "echo"
    assert build_provider(" ECHO ", model="echo-x").model == "echo-x"


async def test_openai_is_built_from_settings() -> None:
    provider = build_provider(
        "openai", openai_base_url="http://127.0.0.1:9/v1", openai_api_key="k", model="gpt-x"
    )
    assert isinstance(provider, OpenAIProvider)
    assert provider.provider_id == "openai"
    assert provider.model == "gpt-x"
    await provider.aclose()


@pytest.mark.parametrize(
    ("base_url", "model", "missing"),
    [
        (None, "gpt-x", "LASH_OPENAI_BASE_URL"),
        ("http://127.0.0.1:9/v1", None, "LASH_MODEL"),
        ("", "", "LASH_OPENAI_BASE_URL and LASH_MODEL"),
    ],
)
def test_openai_needs_base_url_and_model(
    base_url: str | None, model: str | None, missing: str
) -> None:
    with pytest.raises(InvalidRequest, match=missing):
        build_provider("openai", openai_base_url=base_url, model=model)


def test_unknown_provider_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="unknown provider 'anthropic'"):
        build_provider("anthropic")


def test_negative_echo_delay_is_invalid() -> None:
    with pytest.raises(InvalidRequest):
        build_provider("echo", echo_delay_ms=-5)
