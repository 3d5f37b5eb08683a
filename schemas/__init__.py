"""JSON Schema files of the wire contract, generated from :mod:`consumer.wire`.

``python -m schemas.generate`` rewrites them; ``tests/schemas`` fails when the committed
files drift from the models and validates every example in ``schemas/examples``.
"""

from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SCHEMA_DIR / "examples"
