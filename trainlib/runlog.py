"""What a run leaves in its output folder: config.json and env.json at the start, metrics.jsonl as it goes (one JSON
object per line; "kind" is "train", "eval", "skipped", "resume" or "summary"), summary.json and plots.png at the end,
and with --tensorboard the same figures as TensorBoard scalars under tb/. Only rank 0 writes or prints; other ranks
get a `QuietLog` whose methods do nothing. `read_metrics` is how metrics.jsonl is read: without the records that a
resume superseded."""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.shards import atomicio

METRICS, SUMMARY, PLOTS, TENSORBOARD = "metrics.jsonl", "summary.json", "plots.png", "tb"
POSITION = ("epoch", "step", "global_step")  # where a figure was taken, not a figure


class RunLog:
    """Writes nothing before the model, the checkpoint and the weights have been checked, so a start that fails
    leaves no file for a later --resume auto to find (and the run lock, trainlib/runlock.py, removes the folder it
    made for such a start)."""

    def __init__(self, output: Path, append: bool, tensorboard: bool = False):
        self.output, self.append, self.tensorboard = Path(output), append, tensorboard
        self._metrics = self._tb = None

    def _open(self) -> None:
        if self._metrics is not None:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the file; a fresh run in the same folder starts it over.
        self._metrics = open(self.output / METRICS, "a" if self.append else "w", buffering=1)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # only with the flag: tensorboard is an optional extra

            self._tb = SummaryWriter(str(self.output / TENSORBOARD))

    def print(self, line: str) -> None:
        print(line, flush=True)

    def record(self, kind: str, **fields) -> None:
        self._open()
        self._metrics.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")
        if self._tb is not None and "global_step" in fields:
            # The same figures as scalars "<kind>/<field>" (train/loss, eval/acc1, ...) over the global step.
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in POSITION:
                    self._tb.add_scalar(f"{kind}/{name}", value, fields["global_step"])

    def write_json(self, name: str, obj) -> None:
        self._open()
        atomicio.write_json(self.output / name, obj)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def final_lines(output: Path) -> list[str]:
    """The last ` * Acc@1` and the `FPS@all` lines of a finished run, again, from its metrics.jsonl and summary.json:
    what a resumed finished run prints, for the launch scripts that read them from its output."""
    output, lines = Path(output), []
    try:
        evals = [r for r in read_metrics(output) if r.get("kind") == "eval"]
        summary = json.loads((output / SUMMARY).read_text())
    except (OSError, ValueError):
        return lines  # a run stopped by --max-steps before its end has no summary.json: nothing to repeat
    if evals and "acc1" in evals[-1]:
        lines.append(f" * Acc@1 {evals[-1]['acc1']:.3f} Acc@5 {evals[-1]['acc5']:.3f}")
    if isinstance(summary, dict) and summary.get("fps") is not None:
        scope = summary.get("fps_scope", "after warm-up")
        lines.append(f"FPS@all {summary['fps']:.3f}" + ("" if scope == "after warm-up" else f" ({scope})"))
    return lines


def read_metrics(output: Path) -> list[dict]:
    """metrics.jsonl's records in order, less those a resume superseded. A run resumed from a checkpoint trains the
    steps after it again, and logs a marker {"kind": "resume", "from_step": the checkpoint's global step + 1,
    "next_step": the first step it logs, "epoch": the checkpoint's, "checkpoint": path} first; the records the
    interrupted run logged after that checkpoint (of global steps >= from_step, and records without a step, such as
    "skipped", of epochs >= its epoch) come before the marker, and are dropped here: each step is read once, with
    the values of the run that went on. The markers stay."""
    kept: list[dict] = []
    for line in (Path(output) / METRICS).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "resume":
            _drop_superseded(kept, record)
        kept.append(record)
    return kept


def _drop_superseded(kept: list[dict], marker: dict) -> None:
    """Pop off the end of `kept` what `marker`'s checkpoint precedes. Kept records run in step order (superseded ones
    are gone), so the search stops at the first one before the checkpoint, or at an earlier marker whose run started
    before it (all before that marker precede that run). Stopping there also keeps the records of an elastic resume's
    earlier layout, whose global steps are counted in its own steps (docs/training.md)."""
    first, epoch = marker["from_step"], marker.get("epoch", 0)
    while kept:
        last = kept[-1]
        if last.get("kind") == "resume":
            if first >= last.get("next_step", last["from_step"]):
                return
        elif "global_step" in last:
            if last["global_step"] < first:
                return
        elif last.get("epoch", -1) < epoch:  # a record of an epoch's end ("skipped") before the checkpoint
            return
        kept.pop()


class QuietLog:
    """Non-zero ranks: same methods, no output."""

    def print(self, line: str) -> None:
        pass

    def record(self, kind: str, **fields) -> None:
        pass

    def write_json(self, name: str, obj) -> None:
        pass

    def close(self) -> None:
        pass


def environment(device, world_size: int) -> dict:
    """Versions and hardware that decide what a run's numbers mean."""
    import torch  # here, not at the top: the readers of metrics.jsonl (tools/compare_runs.py) need no torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": socket.gethostname(),
            "platform": platform.platform(), "argv": sys.argv, "world_size": world_size,
            "device_kind": device.kind, "device_name": device.name(), "cuda": torch.version.cuda,
            "git_revision": _git_revision()}
    import timm
    info["timm"] = timm.__version__
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    from pipeline.host import pillow_flavour  # the host backend decodes with Pillow; it knows the flavour
    info["pillow"] = pillow_flavour()
    if device.kind == "npu":
        import torch_npu
        info["torch_npu"] = torch_npu.__version__
    return info


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def plot_metrics(output: Path) -> Path | None:
    """plots.png: training loss, global img/s and input-wait share over global steps, from metrics.jsonl; and the
    train image side, when it changed during the run (--min-res)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    train = [r for r in read_metrics(output) if r["kind"] == "train"]
    if not train:
        return None
    steps = [r["global_step"] for r in train]
    panels = (("loss", "train loss", 1), ("img_s", "global img/s", 1), ("input_wait", "input wait (%)", 100))
    if len({r.get("img_size") for r in train}) > 1:
        panels += (("img_size", "train image side (px)", 1),)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True)
    for ax, (key, label, scale) in zip(axes, panels):
        ax.plot(steps, [r[key] * scale for r in train])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("global step")
    fig.tight_layout()
    path = Path(output) / PLOTS
    tmp = atomicio.temp_path(path)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    atomicio.finish_temp(tmp, path)
    return path
