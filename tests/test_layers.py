"""The layout's rules, read from the code's own imports: the offline shard side imports no torch, no import cycle
anywhere, and no module imports from a layer above its own (README, "Layout")."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "model", "trainlib")
# Lowest first. A module may import from its own layer and the ones below; a name stands for itself and everything
# under it, the longest name that matches decides. `pipeline` itself is the lazy facade: only what sits above the
# pipeline's own modules may use it.
LAYERS = (
    ("pipeline.shards",),
    ("pipeline.augment", "pipeline._augment"),
    ("pipeline.plan", "pipeline.resolution", "pipeline.transforms", "pipeline.processes", "pipeline.cli",
     "pipeline._pixels", "pipeline.dali_reader"),
    ("pipeline.loader", "pipeline.shard_loader"),
    ("pipeline.host_worker", "pipeline.host", "pipeline.dali", "pipeline.synthetic", "pipeline.hybrid"),
    ("pipeline.backends", "pipeline.config"),
    ("pipeline.bench", "pipeline"),
    ("model",),
    ("trainlib",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, at any depth of its code (a lazy import inside a function counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pipeline.shards import storage` imports the submodule; `from pipeline import build_loader` the
            # package itself.
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known or a.name.startswith("_") else base
                      for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def layer_of(name: str) -> int:
    best = max(((len(prefix), rank) for rank, names in enumerate(LAYERS) for prefix in names
                if name == prefix or name.startswith(prefix + ".")), default=None)
    assert best is not None, f"{name} sits in no layer: add it to LAYERS"
    return best[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_no_module_imports_from_a_higher_layer(graph):
    upward = [f"{name} -> {target}" for name, targets in graph.items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_the_runtime_never_imports_a_benchmark(graph):
    def bench(name: str) -> bool:
        return "bench" in name.split(".")

    assert not [f"{n} -> {t}" for n, ts in graph.items() if not bench(n) for t in ts if bench(t)]


def test_model_is_pure(graph):
    assert not [f"{n} -> {t}" for n, ts in graph.items() if n.startswith("model") for t in ts
                if not t.startswith("model")]


def test_no_import_cycle(graph):
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_walk_sees_the_imports_it_judges(graph):
    # The rules above hold only if the walk finds edges: these are known imports of today's tree.
    assert "pipeline.shards.errors" in graph["pipeline.shards.storage"]
    assert "pipeline.shards._jpegregion" in graph["pipeline.shards.jpeg"]
    assert "pipeline.loader" in graph["pipeline.host"] and "pipeline.backends" in graph["trainlib.config"]
    assert layer_of("pipeline.shards.writer") < layer_of("pipeline.loader") < layer_of("trainlib.build")
    assert "pipeline.bench.baseline" in graph["pipeline.bench.throughput"]


def test_the_shard_side_imports_no_torch(sample_folder, tmp_path):
    code = ("import sys\n"
            "import pipeline.shards.reader, pipeline.shards.verify, pipeline.shards.writer\n"
            "assert 'torch' not in sys.modules, 'pipeline.shards imported torch'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    # The offline job end to end, -h and a real run: sys.modules is read as the script exits.
    watch = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else 'no torch'))\n"
             "sys.argv = ['make_shards.py', *sys.argv[1:]]\n"
             "runpy.run_path('tools/make_shards.py', run_name='__main__')\n")
    for args in (["-h"], ["--data_path", str(sample_folder), "--out", str(tmp_path / "out"), "--workers", "1"]):
        run = subprocess.run([sys.executable, "-c", watch, *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == "no torch", run.stdout[-500:]
