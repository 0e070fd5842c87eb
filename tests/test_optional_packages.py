"""The suite without its optional packages (webdataset, pyarrow, boto3, scipy, scikit-image), as on a GPU image that
ships only torch, timm, numpy, Pillow and DALI: pytest, run in a subprocess that cannot import them, still collects
every test module, still finds every GPU test (skipped here: the subprocess sees no CUDA device), and the sample data,
made from matplotlib's photo alone, still serves the tests that use it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = ("webdataset", "pyarrow", "boto3", "scipy", "skimage")

# Run at start-up by every Python whose PYTHONPATH starts with its folder: pytest, and every worker or script it
# starts. The path finder answers "not found" for the hidden packages, as for packages that are not installed:
# find_spec gives None and an import raises ModuleNotFoundError; everything else imports from site-packages as before.
# (A stub module per package would raise too, but find_spec would still find it.) It shadows the interpreter's own
# sitecustomize, if it has one; nothing the tests need comes from one.
SITECUSTOMIZE = f'''\
import importlib.machinery
import sys

HIDDEN = {HIDDEN!r}


class HidingPathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''

# One line for each hidden package: its name, what find_spec finds, and what importing it raises.
PROBE = f"""
import importlib, importlib.util
for name in {HIDDEN!r}:
    try:
        importlib.import_module(name)
        error = "imported"
    except ImportError as e:
        error = type(e).__name__
    print(name, importlib.util.find_spec(name), error)
"""


def _env(hide_in: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # no options of the outer run
    env["CUDA_VISIBLE_DEVICES"] = ""  # the GPU tests skip, as here, on a machine with a GPU too
    env["COLUMNS"] = "1000"  # `pytest -v` lines whole, skip reasons included
    if hide_in is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(hide_in), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _start(env: dict, basetemp: Path, *args) -> subprocess.Popen:
    # Own basetemp and no cache: nothing shared with the outer run's files.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={basetemp}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tail(proc: subprocess.CompletedProcess) -> str:
    """The end of a run's output for a failure message; lines cut short, as COLUMNS widens its rules too."""
    return "\n".join(line.rstrip()[:200] for line in (proc.stdout + proc.stderr).splitlines()[-60:])


def _outcomes(stdout: str) -> dict:
    """node id -> "PASSED", "SKIPPED (reason)", "FAILED" or "ERROR", from `pytest -v` lines."""
    return dict(re.findall(r"^(tests/\S+::\S+) ((?:PASSED|FAILED|ERROR|SKIPPED)(?: \(.*\))?)\s+\[\s*\d+%\]$",
                           stdout, re.M))


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> dict:
    """The environment of a Python that cannot import the packages in HIDDEN; checked before any test uses it."""
    folder = tmp_path_factory.mktemp("hide")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = _env(folder)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [f"{name} None ModuleNotFoundError" for name in HIDDEN]
    return env


def test_without_them_every_module_collects_and_every_gpu_test_is_there_to_skip(hidden, tmp_path):
    # Side by side, as each collects the whole suite: the GPU tests as this environment lists them, and a run of
    # them without the packages.
    listing = _start(_env(), tmp_path / "listed", "--collect-only", "-q", "-m", "gpu", "tests")
    run = _wait(_start(hidden, tmp_path / "run", "-v", "-m", "gpu", "tests"))
    listed = _wait(listing)
    assert listed.returncode == 0, _tail(listed)
    gpu_tests = re.findall(r"^(tests/\S+::\S+)$", listed.stdout, re.M)
    assert gpu_tests  # the marker still selects the GPU tests (test_dali.py's, test_fp8.py's, ...)
    # Exit status 0 rules out errors in collection (status 2), which `-m` would not hide: deselection comes after.
    assert run.returncode == 0, _tail(run)
    # Each for want of a device (conftest's reason), none for want of a package: the GPU machine runs them all.
    assert _outcomes(run.stdout) == dict.fromkeys(gpu_tests, "SKIPPED (needs a CUDA device)"), _tail(run)


def test_without_them_the_sample_data_serves_and_only_what_needs_them_skips(hidden, tmp_path):
    no = "SKIPPED ({} is not installed: {})".format
    want = {
        "tests/test_make_sample_data.py::test_layout_names_and_sizes": "PASSED",
        "tests/test_make_sample_data.py::test_classes_are_learnable_from_small_flipped_crops": "PASSED",
        "tests/test_make_shards.py::test_index_points_at_member_bytes": "PASSED",
        "tests/test_make_shards.py::test_round_trip_webdataset_and_tarfile": no("webdataset",
                                                                                "it reads the shards back here"),
        "tests/test_wds.py::test_split_names_and_detection": "PASSED",
        "tests/test_wds.py::test_bad_samples_and_a_cut_tar_are_named": no("webdataset",
                                                                          "it writes this source's tars"),
        "tests/test_augment.py::test_timm_randaugment_spellings": "PASSED",
        "tests/test_augment.py::test_the_chi_square_check_tells_a_different_magnitude_spread": no(
            "scipy", "its chi-square test compares the draws"),
    }
    run = _wait(_start(hidden, tmp_path / "run", "-v", *want))
    assert _outcomes(run.stdout) == want, _tail(run)
    assert run.returncode == 0, _tail(run)
