"""Compact JSON text for the hot path: database parameters and wire bodies.

orjson encodes several times faster than the standard library, and a turn encodes its
events, rows and replies many times over. Its output is the text
``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` gives, except that a float
may spell its exponent differently (``1e-8`` for ``1e-08``; the same number); for what
orjson refuses (integers beyond 64 bits, non-string keys) the standard
library takes over, so nothing that encoded before fails now. Canonical JSON for hashes
stays in :func:`lash_core.inputs.canonical_json`: its bytes must never change.

Parsing stays with the standard library: orjson reads an integer beyond 64 bits as a
float, silently, and ``jsonb`` holds such numbers exactly.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumpb(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text."""
    return dumpb(value).decode("utf-8")
