"""The package's rooms and which way their imports point (docs/design.md, "Rooms").

Every ``import`` and ``from ... import`` in every module, top-level or inside a function, is read
from the source with ``ast``; a module may import its own room or a room below it, never one above
it nor a sibling on its own level (the Cerebro API and DeepPostures know nothing of each other).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cerebro_tasks"

# room -> level; higher levels may import lower ones. Sub-packages and top-level modules are rooms.
LEVELS: dict[str, int] = {
    "spark_entry": 8,
    "cli": 7,
    "jobs": 6,
    "config": 5,
    "deeppostures": 4,
    "cerebro": 4,
    "search": 3,
    "mop": 2,
    "storage": 1,
    "errors": 0,
    "spark_session": 0,
}

# The engine's pure core: no TensorFlow, Spark or Airflow anywhere in these modules.
PURE = ["mop/scheduler.py", "mop/sched_index.py", "mop/lockstep.py", "mop/journal.py", "mop/metric_state.py", "mop/timeline.py",
        "mop/workload.py", "search/space.py", "search/selection.py", "storage/layout.py",
        # the search driver, its searchers and stopping rules: tested in milliseconds without Spark
        "search/driver.py", "search/searcher.py", "search/stopping/__init__.py", "search/stopping/base.py",
        "search/stopping/asha.py", "search/stopping/hyperband.py", "search/stopping/median.py"]
HEAVY = ("tensorflow", "keras", "pyspark", "airflow", "petastorm")


def _room(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "cerebro_tasks":  # `from cerebro_tasks import x`: x is the room
                found += [(node.lineno, f"cerebro_tasks.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute ones")
    return found


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_room_has_a_level():
    rooms = {_room(p) for p in _modules()}
    assert rooms == set(LEVELS), f"rooms without a level: {rooms - set(LEVELS)}, levels of no room: {set(LEVELS) - rooms}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: pathlib.Path):
    room = _room(path)
    wrong = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "cerebro_tasks" or len(parts) < 2:
            continue
        target = parts[1]
        if target == room:
            continue
        if LEVELS[target] >= LEVELS[room]:
            wrong.append(f"line {line}: {name} (room {target!r}, level {LEVELS[target]})")
    assert not wrong, f"{path.relative_to(ROOT)} (room {room!r}, level {LEVELS[room]}) imports up or sideways: {wrong}"


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_import_nothing_heavy(rel: str):
    heavy = [f"line {line}: {name}" for line, name in _imports(PACKAGE / rel) if name.split(".")[0] in HEAVY]
    assert not heavy, f"{rel} must stay pure Python: {heavy}"


def test_the_checker_sees_an_upward_import(tmp_path):
    # the check itself must catch what it is for, function-level imports included
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    from cerebro_tasks.jobs.train import train\n")
    assert ("cerebro_tasks.jobs.train" in [n for _, n in _imports(bad)])
