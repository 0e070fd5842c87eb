"""Every command answers -h from any directory (exit 0, usage on stdout), and the layout rules hold: library code
never imports tools/ or train.py, nothing outside tests/ edits sys.path, and train.py is the only top-level module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [[str(p)] for p in sorted((ROOT / "tools").glob("*.py"))] + [[str(ROOT / "train.py")],
                                                                        ["-m", "pipeline.bench"]]
LIBRARY = ("pipeline", "model", "trainlib")


def test_every_command_answers_help_from_another_directory(tmp_path):
    # All at once: each pays a torch import, which dominates.
    procs = [(cmd, subprocess.Popen([sys.executable, *cmd, "-h"], cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)) for cmd in COMMANDS]
    assert len(procs) >= 10
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{cmd} -h: {err[-2000:]}"
        assert "usage:" in out and "Traceback" not in err, cmd


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", LIBRARY)
def test_library_never_imports_scripts(package):
    scripts = {"tools", "train"} | {p.stem for p in (ROOT / "tools").glob("*.py")}
    for path in (ROOT / package).rglob("*.py"):
        assert not imports_of(path) & scripts, path


def test_tools_import_only_the_library():
    scripts = {"train", "tools"} | {p.stem for p in (ROOT / "tools").glob("*.py")}
    for path in (ROOT / "tools").glob("*.py"):
        assert not imports_of(path) & scripts, f"{path.name} imports a script; put the shared code in a package"
        assert "sys.path" not in path.read_text(), path


def test_the_top_level_holds_one_module():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["train.py"]
    assert not (ROOT / "tools" / "__init__.py").exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh") if p.name != "launch_lib.sh"))
def test_shell_scripts_answer_help_without_doing_anything(script, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools" / script), "-h"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) >= 2, proc.stderr
    assert not proc.stdout.startswith("#") and "set -" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing made
