"""docs/PARITY.md pins the presets: every preset value in its table is the preset's, every recipe key a
reference-copy preset sets has a row, and every row names a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dinov2.config import load_config, resolve_config_path

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "docs" / "PARITY.md"
TRAIN_PRESETS = ("vitl16_short", "vitl14", "vitg14", "vits14", "vitb14")
DISTILL_PRESETS = ("vitg14_to_vits14", "vitg14_to_vitb14", "vitg14_to_vitl14")
DISTILL_COLUMN = "distill/vitg14_to_*"
# keys of the presets that are not recipe hyperparameters (where the data is, how the run is laid out)
NOT_RECIPE = ("data.dataset.", "data.num_workers", "train.", "distributed.")
ABSENT = "—"
SET = "set"  # an optional section (``ibot_head``) that the preset fills in; its fields have rows of their own


def _recipe_table() -> list[dict[str, str]]:
    """The rows of the first table under ``## Recipe``, as ``{column header: cell}``."""
    text = PARITY.read_text()
    section = text.split("\n## Recipe\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").strip()) <= {"-"}, "second table line must be the separator"
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _key(row: dict[str, str]) -> str | None:
    match = re.fullmatch(r"`([a-z_]+(?:\.[a-z0-9_]+)*)`", row["Ours (key)"])
    return match.group(1) if match else None


def _value(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "value", obj)  # enums as their value


def _parse(cell: str):
    value = yaml.safe_load(cell)
    if isinstance(value, str):  # YAML 1.1 reads "1e-05" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _same(cell: str, actual) -> bool:
    if cell == SET:
        return actual is not None
    expected = _parse(cell)
    if isinstance(expected, float) or isinstance(actual, float):
        return isinstance(expected, int | float) and abs(float(expected) - float(actual)) <= 1e-12 * max(
            1.0, abs(float(expected))
        )
    if isinstance(expected, list):
        return len(expected) == len(actual) and all(_same(str(e), a) for e, a in zip(expected, actual, strict=True))
    return expected == actual


ROWS = _recipe_table()
KEYED = [row for row in ROWS if _key(row)]


def test_table_is_parsed_and_covers_every_preset_column():
    assert len(KEYED) >= 50
    for row in KEYED:
        assert {*TRAIN_PRESETS, DISTILL_COLUMN} <= set(row), row


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_presets_match_the_table(preset):
    cfg = load_config(f"train/{preset}")
    checked = 0
    for row in KEYED:
        if row[preset] == ABSENT:
            continue
        key = _key(row)
        assert _same(row[preset], _value(cfg, key)), (
            f"{preset}: {key} is {_value(cfg, key)!r}, PARITY.md says {row[preset]}"
        )
        checked += 1
    assert checked >= 50


@pytest.mark.parametrize("preset", DISTILL_PRESETS)
def test_distillation_presets_match_the_table(preset):
    cfg = load_config(f"distill/{preset}")
    rows = [row for row in KEYED if row[DISTILL_COLUMN] != ABSENT]
    assert len(rows) >= 10
    for row in rows:
        key = _key(row)
        assert _same(row[DISTILL_COLUMN], _value(cfg, key)), f"{preset}: {key} is {_value(cfg, key)!r}"


def _set_keys(name: str) -> set[str]:
    """The dotted keys a preset file and its ``_base_`` ancestors set."""
    keys: set[str] = set()
    path = resolve_config_path(name)
    while True:
        layer = OmegaConf.to_container(OmegaConf.load(path))
        base = layer.pop("_base_", None)

        def walk(node, prefix=""):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    keys.add(f"{prefix}{k}")

        walk(layer)
        if base is None:
            return keys
        path = path.parent / base


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_every_recipe_key_of_a_preset_has_a_row(preset):
    in_table = {_key(row) for row in KEYED}
    set_here = {k for k in _set_keys(f"train/{preset}") if not k.startswith(NOT_RECIPE)}
    assert set_here - in_table == set()


def test_every_row_names_an_existing_test():
    for row in ROWS:
        pinned = row["Pinned by"]
        match = re.fullmatch(r"(test_\w+\.py)::(test_\w+)", pinned)
        assert match, f"'{pinned}' is not file.py::test_name"
        source = (REPO / "tests" / match.group(1)).read_text()
        assert f"def {match.group(2)}(" in source, pinned


def test_behaviour_rows_have_no_preset_values():
    for row in ROWS:
        if _key(row) is None:
            assert all(row[p] == ABSENT for p in (*TRAIN_PRESETS, DISTILL_COLUMN)), row["Setting"]
