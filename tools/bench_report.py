"""Turn a benchmark session's raw JSON lines (tools/bench_gpu.sh RESULTS_DIR/results.jsonl) into the summary that
docs/results/ keeps and the tables docs/benchmarks.md shows, so every published figure comes from a file by a command.

    python tools/bench_report.py RESULTS.jsonl --json docs/results/NAME.json     # one object per batch size x feed
    python tools/bench_report.py RESULTS.jsonl --markdown                        # the tables, for docs/benchmarks.md

Each object of the --json output carries device, backend, feed, batch_size, step_speedup ((b)/(a)), feed_ratio
((c)/(b)), fp8_speedup ((d)/(a)), fp8_vs_ours ((d)/(b)), drift, the img/s behind every ratio, input_wait,
max_wait_s and the versions of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_lines(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg})")
    return rows


def summarize(rows: list[dict]) -> dict:
    """{"training": [...], "pipeline_alone": [...]}, from bench_train's loop/summary lines and pipeline.bench's."""
    versions = next((r for r in rows if r.get("stage") == "versions"), {})
    meta = {k: versions[k] for k in ("torch", "timm", "dali", "pillow") if k in versions}
    loops: dict[tuple, dict] = {}  # (run, batch size, loop): lines of several runs in one file stay apart
    training = []
    for r in rows:
        if "loop" not in r:
            continue
        run, bs = r.get("run"), r["batch_size"]
        if r["loop"] != "summary":
            loops[(run, bs, r["loop"])] = r
            continue
        feed = r.get("feed")
        fed = loops.get((run, bs, f"ours_{feed}"), {}) if feed else {}
        obj = {"device": r["device"], "model": r["model"], "backend": r.get("backend"), "feed": feed,
               "batch_size": bs, "amp": r["amp"], "compile": r["compile"],
               "step_speedup": r.get("step_speedup"), "feed_ratio": r.get("feed_ratio"),
               "fp8_speedup": r.get("fp8_speedup"), "fp8_vs_ours": r.get("fp8_vs_ours"), "drift": r.get("drift"),
               "baseline_img_s": loops.get((run, bs, "baseline"), {}).get("img_s"),
               "ours_img_s": loops.get((run, bs, "ours_synthetic"), {}).get("img_s"),
               "ours_end_img_s": loops.get((run, bs, "ours_synthetic_end"), {}).get("img_s"),
               "fp8_img_s": loops.get((run, bs, "ours_fp8"), {}).get("img_s"),
               "fed_img_s": fed.get("img_s"), "input_wait": fed.get("input_wait"),
               "max_wait_s": fed.get("max_wait_s"), "steps": fed.get("steps"),
               "steps_per_epoch": fed.get("steps_per_epoch"), "workers": fed.get("workers"),
               "hw_decoder_load": fed.get("hw_decoder_load"), "error": fed.get("error"),
               **meta, "torch": r.get("torch", meta.get("torch"))}
        if obj["fp8_vs_ours"] is None and obj["fp8_img_s"] and obj["ours_img_s"]:  # lines from before the field
            obj["fp8_vs_ours"] = round(obj["fp8_img_s"] / obj["ours_img_s"], 4)
        training.append({k: v for k, v in obj.items() if v is not None or k in ("step_speedup", "feed_ratio")})
    alone, pending = [], []
    for r in rows:  # a pipeline.bench line is followed by the line of the bench_gpu.sh stage that ran it
        if r.get("final"):
            pending.append({"device": versions.get("device"), **{k: r[k] for k in (
                "backend", "batch_size", "workers", "img_s", "cpu_cores", "img_per_cpu_s", "mb_s", "seconds",
                "images") if k in r}})
        elif "stage" in r and pending:
            alone += [{"stage": r["stage"], **a} for a in pending]
            pending = []
    return {"training": training, "pipeline_alone": alone + pending}


def fmt(v, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    out = ["| device | batch | feed | (a) baseline img/s | (b) ours img/s | (c) fed img/s | step_speedup (b)/(a) | "
           "feed_ratio (c)/(b) | input wait | longest wait s | FP8 (d)/(a) | FP8 (d)/(b) | drift |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["training"]:
        feed = t.get("feed") or "–"
        if t.get("error"):
            feed += f" (failed: {t['error']})"
        out.append(f"| {t['device']} | {t['batch_size']} | {feed} | {fmt(t.get('baseline_img_s'), ',.0f')} | "
                   f"{fmt(t.get('ours_img_s'), ',.0f')} | {fmt(t.get('fed_img_s'), ',.0f')} | "
                   f"{fmt(t['step_speedup'], '.3f')} | {fmt(t['feed_ratio'], '.3f')} | "
                   f"{fmt(t.get('input_wait'), '.1%')} | {fmt(t.get('max_wait_s'), '.2f')} | "
                   f"{fmt(t.get('fp8_speedup'), '.3f')} | {fmt(t.get('fp8_vs_ours'), '.3f')} | "
                   f"{fmt(t.get('drift'), '.3f')} |")
    if report["pipeline_alone"]:
        out += ["", "| device | pipeline alone | batch | workers | img/s | CPU cores busy | img per CPU-second |",
                "|---|---|---|---|---|---|---|"]
        for a in report["pipeline_alone"]:
            out.append(f"| {a['device']} | {a.get('stage', a['backend'])} | {a['batch_size']} | "
                       f"{a['workers']} | {fmt(a['img_s'], ',.0f')} | {fmt(a.get('cpu_cores'), '.1f')} | "
                       f"{fmt(a.get('img_per_cpu_s'), ',.0f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="JSON lines written by tools/bench_gpu.sh / tools/bench_train.py")
    p.add_argument("--json", type=Path, help="write the summary objects here")
    p.add_argument("--markdown", action="store_true", help="print the tables")
    args = p.parse_args(argv)
    if not args.results.is_file():
        p.error(f"{args.results}: no such file")
    report = summarize(read_lines(args.results))
    if not report["training"] and not report["pipeline_alone"]:
        print(f"{args.results}: no benchmark lines in it", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown or not args.json:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
