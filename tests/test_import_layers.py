"""The package layers of docs/DESIGN.md, checked against every import in ``dinov2/``.

The order is read from the layer table of docs/DESIGN.md (its first code block), so the page and the
code cannot drift apart: a module may import only from its own package or from packages in rows above
it — at the top of the file or inside a function alike (a function-local import hides an edge, it does
not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def design_layers() -> dict[str, int]:
    """``{package or top-level module of dinov2: row}`` from the table of docs/DESIGN.md."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    table = text.split("```")[1]
    rows: dict[str, int] = {}
    for line in table.splitlines():
        if not line or line[0].isspace():  # a row's continuation
            continue
        first = line.split()[0]
        if first.endswith(".py"):  # a row of top-level modules, e.g. "config.py  device.py  …"
            names = [word.removesuffix(".py") for word in line.split() if word.endswith(".py")]
        else:
            names = [first.removesuffix("/")]
        row = len(set(rows.values()))
        rows.update(dict.fromkeys(names, row))
    return rows


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in ``path``, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dinov2" and len(parts) > 1 else None


def test_the_design_table_names_every_package_of_dinov2():
    layers = design_layers()
    packages = {p.name for p in (REPO / "dinov2").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (REPO / "dinov2").glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(layers), sorted((packages | modules) - set(layers))
    assert layers["layers"] < layers["models"] < layers["losses"] < layers["train"] < layers["launch"]


def test_no_module_imports_from_a_layer_below_it():
    layers = design_layers()
    wrong = []
    for path in sorted((REPO / "dinov2").rglob("*.py")):
        here = package_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        if here is None:  # dinov2/__init__.py
            continue
        for line, module in imports_of(path):
            there = package_of(module)
            if there is not None and there in layers and layers[there] > layers[here]:
                wrong.append(f"{path.relative_to(REPO)}:{line} {here} imports {module}")
    assert not wrong, "imports against docs/DESIGN.md's layers:\n" + "\n".join(wrong)
