"""A tiny HTTP/1.1 server for liveness, readiness and Prometheus scraping.

Orchestrators probe ``/healthz`` (liveness: the worker's event loop answers at all) and
``/readyz`` (readiness: the worker's own callback says whether its database, broker and
consumers are up), and Prometheus scrapes ``/metrics``. Three fixed GET endpoints do not
justify a web framework, so this is ``asyncio.start_server`` on the worker's own loop:
a probe that gets an answer proves the loop is not blocked, which is what liveness means
for an asyncio service. Every response closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.observability.logs import get_logger

__all__ = ["HealthServer", "ReadyCheck"]

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]

_log = get_logger(__name__)

_MAX_HEADER_BYTES = 16 * 1024
_REQUEST_TIMEOUT_S = 10.0
_READY_TIMEOUT_S = 5.0
_JSON = "application/json"


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port``.

    ``ready`` is awaited on each ``/readyz`` request and returns ``(ready, details)``;
    the details (e.g. ``{"database": "ok", "broker": "connecting"}``) are the JSON body,
    with status 200 when ready and 503 otherwise. A callback that raises or takes longer
    than ``ready_timeout_s`` counts as not ready.

    ``port`` must be a real port: the service disables the server by not constructing
    it. Tests that need a free port pass ``port=0, ephemeral=True`` and read
    :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        port: int,
        ready: ReadyCheck,
        host: str = "0.0.0.0",
        *,
        ephemeral: bool = False,
        ready_timeout_s: float = _READY_TIMEOUT_S,
    ) -> None:
        if port == 0 and not ephemeral:
            raise ValueError("port 0 disables the HTTP server; pass ephemeral=True for a free port")
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self._requested_port = port
        self._host = host
        self._ready = ready
        self._ready_timeout_s = ready_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the requested one, or the one picked for ``ephemeral``)."""
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._host

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._requested_port,
            reuse_address=True,
            limit=_MAX_HEADER_BYTES,
        )
        _log.info("http server listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await asyncio.wait_for(self._serve(reader, writer), _REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            with contextlib.suppress(ConnectionError):
                await self._respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"", _JSON)
        except Exception:
            _log.exception("http request failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            await self._respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"", _JSON)
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._respond(
                writer, HTTPStatus.BAD_REQUEST, _body({"error": "bad request"}), _JSON
            )
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(
                writer,
                HTTPStatus.METHOD_NOT_ALLOWED,
                _body({"error": "method not allowed"}),
                _JSON,
                extra_headers={"Allow": "GET, HEAD"},
            )
            return
        status, body, content_type = await self._route(path)
        await self._respond(writer, status, body, content_type, head_only=method == "HEAD")

    async def _route(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        if path == "/healthz":
            return HTTPStatus.OK, _body({"status": "ok"}), _JSON
        if path == "/readyz":
            ready, details = await self._check_ready()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, _body({"ready": ready, "checks": details}), _JSON
        if path == "/metrics":
            return HTTPStatus.OK, generate_latest(), CONTENT_TYPE_LATEST
        return HTTPStatus.NOT_FOUND, _body({"error": "not found"}), _JSON

    async def _check_ready(self) -> tuple[bool, dict[str, str]]:
        try:
            ready, details = await asyncio.wait_for(self._ready(), self._ready_timeout_s)
        except TimeoutError:
            return False, {"error": "readiness check timed out"}
        except Exception as exc:
            _log.warning("readiness check failed", error=repr(exc))
            return False, {"error": f"readiness check failed: {type(exc).__name__}"}
        return bool(ready), {str(k): str(v) for k, v in details.items()}

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        head_only: bool = False,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **(extra_headers or {}),
        }
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else body))
        await writer.drain()


def _body(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, sort_keys=True).encode()
