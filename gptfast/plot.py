"""`python -m gptfast.plot RUN_DIR [RUN_DIR ...] -o curves.png`: training curves of one or several runs.

Reads each run's metrics.jsonl and draws, runs side by side in one figure titled with their names:
train and val loss against tokens, val loss against training wall time, train loss, learning rate,
tokens/s, MFU and peak memory against the step; a panel no run recorded (MFU on a CPU) is left
out. `--log-loss` draws the loss axes on a log scale. `--bench RESULTS.json` draws a benchmark results file instead: per case, each provider's
time relative to gptfast's (bars > 1: gptfast is faster). Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptfast.errors import DataError, run_cli


def read_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """A run's records by kind: "train" (logged steps), "val" (evaluations), "summary"."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is it a run directory, with the jsonl log backend?)")
    out: dict[str, list[dict]] = {"train": [], "val": [], "summary": []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            continue
        if record.get("event") == "summary":
            out["summary"].append(record)
        elif "val_loss" in record:
            out["val"].append(record)
        elif "loss" in record and not record.get("skipped"):
            out["train"].append(record)
    if not out["train"] and not out["val"]:
        raise DataError(f"{path}: holds no logged steps yet")
    return out


def _series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


# (title, x, [(record kind, y, label)]): the panels a run can fill; one with nothing recorded in any
# run (MFU or GPU memory on a CPU) is left out
PANELS = [
    ("loss against tokens", "tokens", [("train", "loss", "train"), ("val", "val_loss", "val")]),
    ("val loss against training time", "elapsed_seconds", [("val", "val_loss", "val")]),
    ("train loss against step", "step", [("train", "loss", "train")]),
    ("learning rate", "step", [("train", "lr", "")]),
    ("tokens/s", "step", [("train", "tokens_per_second", "")]),
    ("MFU", "step", [("train", "mfu", "")]),
    ("peak memory (GiB)", "step", [("train", "peak_memory_bytes", "")]),
]
X_LABELS = {"tokens": "tokens", "elapsed_seconds": "hours of training", "step": "optimizer step"}
SCALES = {"peak_memory_bytes": 1 / 2**30, "elapsed_seconds": 1 / 3600}


def plot_runs(run_dirs: list[str | Path], output: str | Path, log_loss: bool = False, title: str | None = None):
    """Draw the runs into `output` (PNG); returns the matplotlib Figure. `log_loss`: the loss axes
    logarithmic; `title`: the figure's (default: the runs' names)."""
    plt = _pyplot()
    runs = {str(d): read_run(d) for d in run_dirs}

    def lines(x, curves):
        for index, (name, records) in enumerate(runs.items()):
            for kind, y, label in curves:
                xs, ys = _series(records[kind], x, y)
                if xs:
                    yield index, name, kind, label, [v * SCALES.get(x, 1) for v in xs], [v * SCALES.get(y, 1) for v in ys]

    panels = [(t, x, drawn) for t, x, curves in PANELS if (drawn := list(lines(x, curves)))]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.3 * cols, 4.5 * rows), squeeze=False)
    for ax, (panel, x, drawn) in zip(axes.flat, panels):
        for index, name, kind, label, xs, ys in drawn:
            # one colour per run; val dashed with markers
            ax.plot(xs, ys, color=f"C{index % 10}", linestyle="--" if kind == "val" else "-",
                    marker="o" if kind == "val" else None, markersize=3, label=f"{name} {label}".strip())
        ax.set_title(panel)
        ax.set_xlabel(X_LABELS[x])
        if log_loss and "loss" in panel:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    fig.suptitle(title or " vs ".join(Path(name).name or name for name in runs), fontsize=11)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    return fig


def plot_bench(results: str | Path, output: str | Path):
    """Bars of each provider's time / gptfast's, per case of a bench/results/*.json file."""
    plt = _pyplot()
    try:
        payload = json.loads(Path(results).read_text())
        rows = payload["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{results}: not a gptfast benchmark results file ({e})") from None
    ours = {(r["suite"], r["case"]): r["seconds"] for r in rows if r["provider"] == "gptfast"}
    ratios: dict[str, dict[str, float]] = {}
    for r in rows:
        key = (r["suite"], r["case"])
        if r["provider"] != "gptfast" and key in ours and ours[key] > 0:
            ratios.setdefault(f"{key[0]}: {key[1]}", {})[r["provider"]] = r["seconds"] / ours[key]
    if not ratios:
        raise DataError(f"{results}: no case has both a gptfast row and another provider's")
    providers = sorted({p for v in ratios.values() for p in v})
    cases = list(ratios)
    fig, ax = plt.subplots(figsize=(12, max(3, 0.4 * len(cases) * len(providers))))
    height = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        ys = [j + i * height for j in range(len(cases))]
        ax.barh(ys, [ratios[c].get(provider, 0) for c in cases], height=height, label=provider)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(cases))], cases, fontsize=7)
    ax.set_xlabel("provider's time / gptfast's (> 1: gptfast is faster)")
    device = payload.get("device", {})
    ax.set_title(f"{device.get('label', device.get('name', '?'))} @ {device.get('git_sha', '?')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    return fig


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DataError("plotting needs matplotlib, which is not installed: pip install -e \".[plot]\"") from None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (train.out_dir)")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--bench", metavar="RESULTS_JSON", help="draw a bench/results/*.json file instead")
    parser.add_argument("--log-loss", action="store_true", help="draw the loss axes on a log scale")
    parser.add_argument("--title", help="the figure's title (default: the run directories' names)")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.bench):
        parser.error("give one or more RUN_DIRs, or --bench RESULTS_JSON")

    def draw():
        if args.bench:
            plot_bench(args.bench, args.output)
        else:
            plot_runs(args.runs, args.output, log_loss=args.log_loss, title=args.title)
        print(f"wrote {args.output}")

    return run_cli(draw)


if __name__ == "__main__":
    sys.exit(main())
