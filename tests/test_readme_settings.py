"""The README's configuration table documents exactly the fields of ``Settings``.

Every ``consumer.settings.Settings`` field must appear as ``LASH_<FIELD>`` in the table,
and every ``LASH_`` name in the table must be a real field, so the documentation cannot
drift from the code in either direction.
"""

from __future__ import annotations

import re
from pathlib import Path

from consumer.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def _configuration_table() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Configuration' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the Configuration section has no table"
    return rows[2:]  # header and separator


def _documented() -> list[str]:
    names: list[str] = []
    for row in _configuration_table():
        first_cell = row.split("|")[1]
        names += re.findall(r"`(LASH_[A-Z0-9_]+)`", first_cell)
    return names


def test_every_setting_is_documented() -> None:
    documented = set(_documented())
    expected = {f"LASH_{name.upper()}" for name in Settings.model_fields}
    assert sorted(expected - documented) == []


def test_every_documented_setting_exists() -> None:
    documented = _documented()
    fields = {f"LASH_{name.upper()}" for name in Settings.model_fields}
    assert sorted(set(documented) - fields) == []
    assert len(documented) == len(set(documented)), "a setting is listed twice"


def test_env_prefix_is_lash() -> None:
    assert Settings.model_config.get("env_prefix") == "LASH_"


def test_documented_defaults_match_the_model() -> None:
    for row in _configuration_table():
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        (name,) = re.findall(r"`(LASH_[A-Z0-9_]+)`", cells[0])
        field = Settings.model_fields[name.removeprefix("LASH_").lower()]
        if field.default_factory is not None or field.default is None:
            assert not cells[1].startswith("`"), f"{name}: no literal default in the model"
            continue
        documented = cells[1].strip("`")
        default = field.default
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert float(documented) == float(default), name
        else:
            assert documented == str(default), name
