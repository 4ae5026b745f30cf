"""Turn a folder of runs into a Markdown results table (mean ± std over seeds) and training curves.

    python report.py runs/sweep-cifar10-resnet110-to-resnet20            # writes report.md there
    python report.py RUNS --output results.md --no-plots

A run is any folder below RUNS holding args.json and metrics.csv (written by train_base.py or
train_kd.py). Runs are grouped by data set, epochs, method ('baseline' for train_base.py), model and teacher; each
row gives, over its seeds: the last-epoch test top-1, the best-epoch test top-1 (the epoch chosen
on the validation split when one was held out, else on the test set itself, and the column says
which), the gain of the last-epoch mean over the same model's baseline, the published number where
there is one, and the mean wall time per run. Standard deviations are sample ones (n - 1).
Plots (test top-1 and training loss per epoch, mean over seeds, one line per row) need matplotlib.
"""
import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict

# Published test top-1 (%) for the ResNet-110 teacher / ResNet-20 student pair: (seed zoo, CRD paper).
# test top-1 (%) of the seed zoo's README (ResNet-110 -> ResNet-20, single runs) and, for CIFAR-100,
# of the CRD benchmark (RepDistiller's README; DKD from mdistiller's README), keyed by
# (method, student, teacher); a baseline's teacher is None
_SEED_ZOO_R20 = {  # method: (CIFAR-10, CIFAR-100)
    "logits": (92.98, 69.78), "st": (92.82, 70.06), "at": (93.21, 69.28), "fitnet": (93.04, 69.81),
    "nst": (92.83, 69.31), "pkt": (93.01, 69.31), "fsp": (92.78, 69.78), "ft": (93.01, 69.49),
    "rkd": (93.21, 69.36), "ab": (92.96, 69.41), "sp": (93.30, 69.45), "sobolev": (92.60, 69.23),
    "bss": (92.78, 69.71), "cc": (92.98, 69.33), "lwm": (92.52, 69.11), "irg": (93.13, 69.36),
    "vid": (92.98, 69.49), "ofd": (93.13, 69.81), "afd": (92.92, 69.60), "crd": (92.92, 70.80),
    "dml": (92.92, 70.29),
}
_CRD_BENCHMARK = {  # (student, teacher): {method: CIFAR-100 top-1}
    ("resnet20", "resnet110"): {"st": 70.67, "fitnet": 68.99, "at": 70.22, "sp": 70.04, "cc": 69.48, "vid": 70.16,
                                "rkd": 69.25, "pkt": 70.25, "ab": 69.53, "ft": 70.22, "fsp": 70.11, "nst": 69.53,
                                "crd": 71.46},
    ("resnet8x4", "resnet32x4"): {"st": 73.33, "fitnet": 73.50, "at": 73.44, "sp": 72.94, "cc": 72.97, "vid": 73.09,
                                  "rkd": 71.90, "pkt": 73.64, "ab": 73.17, "ft": 72.86, "fsp": 72.62, "nst": 73.30,
                                  "crd": 75.51, "dkd": 76.32},
    ("wrn_16_2", "wrn_40_2"): {"st": 74.92, "fitnet": 73.58, "at": 74.08, "sp": 73.83, "cc": 73.56, "vid": 74.11,
                               "rkd": 73.35, "pkt": 74.54, "ab": 72.50, "ft": 73.25, "fsp": 72.91, "nst": 73.68,
                               "crd": 75.48, "dkd": 76.23},
    ("resnet20", "resnet56"): {"st": 70.66, "fitnet": 69.21, "at": 70.55, "sp": 69.67, "cc": 69.63, "vid": 70.38,
                               "rkd": 69.61, "pkt": 70.34, "ab": 69.47, "ft": 69.84, "fsp": 69.95, "nst": 69.60,
                               "crd": 71.16, "dkd": 71.97},
    ("resnet32", "resnet110"): {"st": 73.08, "fitnet": 71.06, "at": 72.31, "sp": 72.69, "cc": 71.48, "vid": 72.61,
                                "rkd": 71.82, "pkt": 72.61, "ab": 70.98, "ft": 72.37, "fsp": 71.89, "nst": 71.96,
                                "crd": 73.48, "dkd": 74.11},
}
_CRD_BASELINES = {"resnet20": 69.06, "resnet32": 71.14, "resnet56": 72.34, "resnet110": 74.31, "resnet8x4": 72.50,
                  "resnet32x4": 79.42, "wrn_16_2": 73.26, "wrn_40_2": 75.61}
PUBLISHED = {
    "cifar10": {**{(m, "resnet20", "resnet110"): c10 for m, (c10, _) in _SEED_ZOO_R20.items()},
                ("baseline", "resnet20", None): 92.37, ("baseline", "resnet110", None): 93.86},
    "cifar100": {
        **{(m, s, t): (None, top1) for (s, t), rows in _CRD_BENCHMARK.items() for m, top1 in rows.items()},
        **{(m, "resnet20", "resnet110"): (c100, _CRD_BENCHMARK[("resnet20", "resnet110")].get(m))
           for m, (_, c100) in _SEED_ZOO_R20.items()},
        **{("baseline", model, None): (None, top1) for model, top1 in _CRD_BASELINES.items()},
        ("baseline", "resnet20", None): (68.92, 69.06), ("baseline", "resnet110", None): (73.15, 74.31),
    },
}


def read_runs(root):
    """One dict per run folder below root: its args, metrics rows and derived numbers."""
    runs = []
    for folder, _, files in sorted(os.walk(root)):
        if "args.json" not in files or "metrics.csv" not in files:
            continue
        with open(os.path.join(folder, "args.json")) as f:
            args = json.load(f)
        with open(os.path.join(folder, "metrics.csv")) as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        if not rows:
            continue
        selector = "val_top1" if "val_top1" in rows[0] else "test_top1"
        best = max(rows, key=lambda r: r[selector])  # the first epoch with the highest score
        runs.append({"folder": folder, "dataset": args["dataset"], "method": args.get("method", "baseline"),
                     "epochs": args["epochs"],
                     "model": args["model"], "teacher": args.get("teacher_arch"), "seed": args["seed"],
                     "complete": len(rows) >= args["epochs"], "rows": rows, "last": rows[-1]["test_top1"],
                     "best": best["test_top1"], "selected_on": selector[:-5],
                     "seconds": sum(r["seconds"] for r in rows)})
    return runs


def mean_std(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean, std):
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def summarise(runs):
    """Rows of the table: one per (data set, epochs, method, model, teacher), baselines first."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["epochs"], run["method"], run["model"], run["teacher"])].append(run)
    baselines = {(d, epochs, model): mean_std([r["last"] for r in g])[0]
                 for (d, epochs, method, model, _), g in groups.items() if method == "baseline"}
    table = []
    order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "baseline"))
    for (dataset, epochs, method, model, teacher), group in order:
        last, best = mean_std([r["last"] for r in group]), mean_std([r["best"] for r in group])
        base = baselines.get((dataset, epochs, model))
        published = PUBLISHED.get(dataset, {}).get((method, model, None if method == "baseline" else teacher))
        table.append({"dataset": dataset, "epochs": epochs, "method": method, "model": model, "teacher": teacher,
                      "runs": group,
                      "seeds": sorted(r["seed"] for r in group), "last": last, "best": best,
                      "gain": None if base is None or method == "baseline" else last[0] - base,
                      "selected_on": "/".join(sorted({r["selected_on"] for r in group})),
                      "published": published, "seconds": statistics.fmean(r["seconds"] for r in group),
                      "incomplete": sum(not r["complete"] for r in group)})
    return table


def markdown(table):
    lines = ["| data set | epochs | method | student | teacher | seeds | last-epoch top-1 | best-epoch top-1 "
             "(chosen on) | gain over baseline | published (seed zoo / CRD benchmark) | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        published = row["published"]
        if isinstance(published, tuple):
            published = " / ".join("–" if p is None else f"{p:.2f}" for p in published)
        elif published is not None:
            published = f"{published:.2f}"
        note = f" ({row['incomplete']} incomplete)" if row["incomplete"] else ""
        gain = "–" if row["gain"] is None else f"{row['gain']:+.2f}"
        lines.append(
            f"| {row['dataset']} | {row['epochs']} | {row['method']} | {row['model']} | {row['teacher'] or '–'} | "
            f"{','.join(map(str, row['seeds']))}{note} | {fmt(*row['last'])} | {fmt(*row['best'])} "
            f"({row['selected_on']}) | {gain} | "
            f"{published or '–'} | {row['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(table, folder):
    """Writes test_top1.png and train_loss.png; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for key, label in (("test_top1", "test top-1 (%)"), ("train_loss", "training loss")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for row in table:
            epochs = min(len(r["rows"]) for r in row["runs"])
            curve = [statistics.fmean(r["rows"][e][key] for r in row["runs"]) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), curve, label=f"{row['method']} {row['model']} ({row['dataset']})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label + ", mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(folder, f"{key}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("runs", help="folder holding run folders")
    parser.add_argument("--output", help="Markdown file to write (default: RUNS/report.md)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    args = parser.parse_args()
    runs = read_runs(args.runs)
    if not runs:
        sys.exit(f"error: no runs (folders with args.json and metrics.csv) below {args.runs}.")
    table = summarise(runs)
    text = markdown(table)
    output = args.output or os.path.join(args.runs, "report.md")
    with open(output, "w") as f:
        f.write(text)
    print(text + f"written to {output}")
    if not args.no_plots:
        try:
            paths = plot(table, os.path.dirname(os.path.abspath(output)))
            print("plots: " + ", ".join(paths))
        except ImportError:
            print("note: matplotlib is not installed, so no plots were drawn (pip install matplotlib)")


if __name__ == "__main__":
    main()
