"""``lash_core.jsontext`` writes what the standard library's compact form wrote: the same
text, except that a float may spell its exponent differently (``1e-8`` for ``1e-08``)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from lash_core import jsontext

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_SCALARS = st.none() | st.booleans() | st.integers() | _TEXT
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def _json(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_TEXT, inner, max_size=5),
        max_leaves=30,
    )


def _stdlib(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@given(_json(_SCALARS))
def test_same_text_as_the_standard_library(value: Any) -> None:
    assert jsontext.dumps(value) == _stdlib(value)
    assert jsontext.dumpb(value) == _stdlib(value).encode("utf-8")


@given(_json(_SCALARS | _FLOATS))
def test_same_value_as_the_standard_library(value: Any) -> None:
    assert json.loads(jsontext.dumps(value)) == json.loads(_stdlib(value))


def test_what_orjson_refuses_still_encodes() -> None:
    huge = {"n": 123456789012345678901234567890, 7: "int key"}
    assert jsontext.dumps(huge) == _stdlib(huge)
    assert json.loads(jsontext.dumps(huge))["n"] == 123456789012345678901234567890
