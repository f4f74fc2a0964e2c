"""The package's shape: no import cycles, serving apart from training, run-file names in
one module, modules of a readable size. Static (ast), no imports of the package needed."""

import ast
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "emdpo_ray")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PKG))
                name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[name] = os.path.join(folder, f)
    return out


def _imports(path: str, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


GRAPH = {m: _imports(p, set(_modules())) - {m} for m, p in _modules().items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_constructed_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    # Package __init__ files import nothing, so module edges are the whole story.
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if m.startswith("emdpo_ray.serve")))
def test_serving_imports_nothing_from_training(mod):
    assert not {m for m in GRAPH[mod] if m.startswith("emdpo_ray.train")}, GRAPH[mod]


def test_pure_math_imports_no_ray_and_no_models():
    for mod in (m for m in GRAPH if m.startswith("emdpo_ray.core")):
        src = open(_modules()[mod], encoding="utf-8").read()
        assert not re.search(r"^\s*(import ray|from ray)", src, re.M), mod
        assert not {m for m in GRAPH[mod] if not m.startswith("emdpo_ray.core")}, (mod, GRAPH[mod])


RUN_FILES = ["run.json", "config.yaml", "state.json", "history.json", "posteriors.jsonl",
             "summary.json", "mmra.json", "mmra_samples.jsonl", "eval.json", "base_model",
             "ray_results",
             "wal.jsonl", "snapshot.json"]


def test_run_file_names_live_in_the_run_directory_module():
    owner = os.path.join(PKG, "run", "rundir.py")
    for mod, path in _modules().items():
        if path == owner:
            continue
        src = open(path, encoding="utf-8").read()
        for name in RUN_FILES:
            assert not re.search(rf"[\"']{re.escape(name)}[\"']", src), (mod, name)


def test_modules_stay_readable():
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in _modules().items()}
    assert max(sizes.values()) <= 400, {m: n for m, n in sizes.items() if n > 400}


def test_readme_run_directory_table_names_every_run_file():
    """Every name of the layout in run/rundir.py appears in the README's run-directory table."""
    src = open(os.path.join(PKG, "run", "rundir.py"), encoding="utf-8").read()
    layout = src[src.index("# The layout"):src.index("SINGLE_DPO =")]
    names = re.findall(r'^[A-Z_]+ = "([^"]+)"', layout, re.M)
    readme = open(os.path.join(os.path.dirname(PKG), "README.md"), encoding="utf-8").read()
    table = readme[readme.index("### Run directory"):readme.index("Every file is written atomically")]
    missing = [n for n in names if n not in table]
    assert len(names) >= 15 and not missing, missing
