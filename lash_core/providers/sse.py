"""Server-sent events decoding (the ``text/event-stream`` framing, data fields only).

OpenAI-compatible endpoints stream one JSON document per event in ``data:`` lines and end
with ``data: [DONE]``. This module only does the framing: lines in, event payloads out.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable


async def sse_data(lines: AsyncIterable[str]) -> AsyncGenerator[str, None]:
    """Yield the data payload of each event.

    Follows the SSE rules that matter here: a blank line dispatches the event, several
    ``data:`` lines of one event are joined with ``"\\n"``, one space after the colon is
    dropped, comment lines (``:``) and other fields (``event:``, ``id:``, ``retry:``) are
    ignored, and an event still open when the stream ends is dispatched.
    """
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field != "data":
            continue
        data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
