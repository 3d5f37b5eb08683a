"""The health server answers /healthz, /readyz and /metrics over a real socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from consumer.observability import metrics
from consumer.observability.health import HealthServer


class _Readiness:
    def __init__(self) -> None:
        self.ready = False
        self.fail = False

    async def __call__(self) -> tuple[bool, dict[str, str]]:
        if self.fail:
            raise RuntimeError("database exploded")
        return self.ready, {"database": "ok", "broker": "ok" if self.ready else "connecting"}


async def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or method == "HEAD"
    return int(status_line.split()[1]), headers, body


@pytest.fixture
async def server() -> AsyncIterator[tuple[HealthServer, _Readiness]]:
    readiness = _Readiness()
    srv = HealthServer(0, readiness, host="127.0.0.1", ephemeral=True)
    await srv.start()
    try:
        yield srv, readiness
    finally:
        await srv.stop()


async def test_healthz(server: tuple[HealthServer, _Readiness]) -> None:
    srv, _ = server
    assert srv.port > 0
    status, headers, body = await _request(srv.port, "GET", "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


async def test_readyz_follows_the_callback(server: tuple[HealthServer, _Readiness]) -> None:
    srv, readiness = server
    status, _, body = await _request(srv.port, "GET", "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "checks": {"database": "ok", "broker": "connecting"},
    }
    readiness.ready = True
    status, _, body = await _request(srv.port, "GET", "/readyz")
    assert status == 200
    assert json.loads(body)["checks"] == {"database": "ok", "broker": "ok"}
    readiness.fail = True
    status, _, body = await _request(srv.port, "GET", "/readyz")
    assert status == 503
    assert "RuntimeError" in json.loads(body)["checks"]["error"]


async def test_metrics_exposition(server: tuple[HealthServer, _Readiness]) -> None:
    srv, _ = server
    metrics.ACTIVE_SESSIONS.set(3)
    status, headers, body = await _request(srv.port, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE lash_turns_total counter" in text
    assert "lash_active_sessions 3.0" in text


async def test_other_paths_and_methods(server: tuple[HealthServer, _Readiness]) -> None:
    srv, _ = server
    status, _, _ = await _request(srv.port, "GET", "/nope")
    assert status == 404
    status, headers, _ = await _request(srv.port, "POST", "/healthz")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    status, headers, body = await _request(srv.port, "HEAD", "/healthz")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, _ = await _request(srv.port, "GET", "/healthz?verbose=1")
    assert status == 200


async def test_garbage_request_gets_400(server: tuple[HealthServer, _Readiness]) -> None:
    srv, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"hello\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_slow_readiness_counts_as_not_ready() -> None:
    async def slow() -> tuple[bool, dict[str, str]]:
        await asyncio.Event().wait()
        return True, {}

    srv = HealthServer(0, slow, host="127.0.0.1", ephemeral=True, ready_timeout_s=0.05)
    await srv.start()
    try:
        status, _, body = await _request(srv.port, "GET", "/readyz")
    finally:
        await srv.stop()
    assert status == 503
    assert json.loads(body)["checks"] == {"error": "readiness check timed out"}


async def test_stop_closes_idle_connections_and_the_port() -> None:
    srv = HealthServer(0, _Readiness(), host="127.0.0.1", ephemeral=True)
    await srv.start()
    port = srv.port
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)  # never sends
    await asyncio.wait_for(srv.stop(), 5)
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_port_zero_needs_the_ephemeral_flag() -> None:
    with pytest.raises(ValueError):
        HealthServer(0, _Readiness())
