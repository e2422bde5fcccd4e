"""The house's floors, enforced from the source: no import circle, no arrow that runs back up, no private name used
outside its package (benchmarks/import_graph.py draws the same graph)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = graph
_spec.loader.exec_module(graph)

# Each stage may import only stages on a strictly lower floor: two stages on one floor (export and bench, analyze and
# compress) import neither the other. Data flows upward: bundle -> finetune -> compress -> export -> bench -> study,
# with recovery and TuneComp (in finetune) standing on compress's methods; tune, like study, drives compress, export
# (the backend's files) and bench (their timing).
FLOORS = {
    "craft_deploy": 0,
    "artifacts": 1,
    "records": 2,
    "toolkit": 2,
    "data": 3,
    "evaluate": 3,
    "config": 3,
    "runtimes": 3,
    "models": 4,
    "analyze": 5,
    "compress": 5,
    "finetune": 6,
    "export": 7,
    "bench": 7,
    "study": 8,
    "tune": 8,
    "cli": 9,
}

EDGES = graph.edges()


def test_every_stage_has_a_floor():
    assert {graph.stage(m) for m in graph.modules()} == set(FLOORS)


def test_no_import_circle():
    assert graph.circles(EDGES) == []


@pytest.mark.parametrize("source", sorted(set(FLOORS) - {"craft_deploy"}))
def test_no_arrow_runs_back_up(source):
    wrong = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in EDGES
        if graph.stage(e.source) == source
        and graph.stage(e.target) != source
        and FLOORS[graph.stage(e.target)] >= FLOORS[source]
    ]
    assert wrong == []


def test_no_private_name_is_used_outside_its_package():
    assert [f"{e.source}:{e.line} {e.names}" for e in graph.private_uses(EDGES)] == []


def test_the_toolkit_imports_no_stage_and_no_models_or_data():
    outside = {graph.stage(e.target) for e in EDGES if graph.stage(e.source) == "toolkit"} - {"toolkit"}
    assert outside <= {"craft_deploy"}


def test_the_graph_sees_a_circle_and_a_back_arrow_where_there_are_some(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with both defects is caught."""
    pkg = tmp_path / "craft_deploy"
    (pkg / "toolkit").mkdir(parents=True)
    (pkg / "export").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toolkit" / "__init__.py").write_text("")
    (pkg / "toolkit" / "a.py").write_text("def f():\n    from craft_deploy.export import g\n")
    (pkg / "export" / "__init__.py").write_text("from craft_deploy.toolkit.a import f\nfrom .x import _hidden\n")
    (pkg / "export" / "x.py").write_text("_hidden = 1\n")
    (pkg / "bench.py").write_text("from craft_deploy.export.x import _hidden\n")
    monkeypatch.setattr(graph, "PACKAGES", {"craft_deploy": pkg})
    edges = graph.edges()
    assert graph.circles(edges) == [["craft_deploy.export", "craft_deploy.toolkit.a"]]
    assert [e.deferred for e in edges if e.source == "craft_deploy.toolkit.a"] == [True]
    assert [(e.source, e.names) for e in graph.private_uses(edges)] == [("craft_deploy.bench", ("_hidden",))]


def test_reading_a_manifest_loads_no_stage_before_a_method_is_looked_up():
    code = (
        "import sys, craft_deploy.models.manifest as m; "
        "print(sorted({n.split('.')[1] for n in sys.modules if n.startswith('craft_deploy.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "compress" not in out.stdout and "toolkit" in out.stdout


def test_every_package_is_installed():
    """A package missing from pyproject's explicit list works in this checkout and is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in graph.modules().items() if p.name == "__init__.py"}
    assert found == listed
