"""What a run leaves in its output folder: config.json and env.json at the start, metrics.jsonl as it goes (one JSON
object per line; "kind" is "train", "eval", "skipped" or "summary"), summary.json and plots.png at the end, and with
--tensorboard the same figures as TensorBoard scalars under tb/. Only rank 0 writes or prints; other ranks get a
`QuietLog` whose methods do nothing."""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.shards import atomicio

METRICS, SUMMARY, PLOTS, TENSORBOARD = "metrics.jsonl", "summary.json", "plots.png", "tb"
POSITION = ("epoch", "step", "global_step")  # where a figure was taken, not a figure


class RunLog:
    """The run folder appears with the first file written, not before: a start that fails while the model, the
    checkpoint or the weights are still being checked leaves no folder for a later --resume auto to find."""

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
        evals = [r for r in map(json.loads, (output / METRICS).read_text().splitlines()) if r.get("kind") == "eval"]
        summary = json.loads((output / SUMMARY).read_text())
    except (OSError, ValueError):
        return lines  # a run stopped by --max-steps before its end has no summary.json: nothing to repeat
    if evals and "acc1" in evals[-1]:
        lines.append(f" * Acc@1 {evals[-1]['acc1']:.3f} Acc@5 {evals[-1]['acc5']:.3f}")
    if isinstance(summary, dict) and summary.get("fps") is not None:
        scope = summary.get("fps_scope", "after warm-up")
        lines.append(f"FPS@all {summary['fps']:.3f}" + ("" if scope == "after warm-up" else f" ({scope})"))
    return lines


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

    rows = [json.loads(line) for line in (Path(output) / METRICS).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
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
