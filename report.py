"""Turn a folder of runs into a Markdown results table (mean ± std over seeds) and training curves.

    python report.py runs/sweep-cifar10-resnet110-to-resnet20            # writes report.md there
    python report.py RUNS --output results.md --no-plots

A run is any folder below RUNS holding args.json and metrics.csv (written by train_base.py or
train_kd.py). Runs are grouped by data set, epochs, method ('baseline' for train_base.py; a KD run
whose weights or method flags differ from the method's defaults is labelled with them, e.g.
'rkd (kd weight 0.1)'), model and teacher; each row gives, over its seeds: the last-epoch test
top-1, the best-epoch test top-1 (the epoch chosen on the validation split when one was held out,
else on the test set itself, and the column says which), the gain of the last-epoch mean over the
same model's baseline, the published number where there is one (marked as not comparable for runs
shorter than their data set's recipe, and for a labelled variant), and the mean wall time per run.
Standard deviations are sample ones (n - 1).
Plots (test top-1 and training loss per epoch, mean over seeds, one line per row) need matplotlib.
"""
import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict

from config import RECIPES
from kd_losses import METHODS, default_hyperparameters, default_weight

# Published test top-1 (%), from docs/published.csv (the seed zoo's README: ResNet-110 -> ResNet-20, single runs;
# the CRD benchmark: RepDistiller's README, DKD from mdistiller's), keyed by data set, then by
# (method, student, teacher) with teacher None for a baseline. A data set with seed zoo numbers only holds plain
# numbers (CIFAR-10); any other holds (seed zoo, CRD benchmark) pairs, None where a source has no number (CIFAR-100).
PUBLISHED_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "published.csv")
SOURCES = ("seed zoo", "CRD benchmark")


def published_rows(path=PUBLISHED_CSV):
    """docs/published.csv's rows in file order: top1 a float, teacher None for a baseline."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for line, row in enumerate(rows, start=2):
        if row["source"] not in SOURCES:
            raise ValueError(f"{path}:{line}: source {row['source']!r} is not one of {SOURCES}")
        row["teacher"], row["top1"] = row["teacher"] or None, float(row["top1"])
    return rows


def read_published(path=PUBLISHED_CSV):
    numbers = defaultdict(dict)  # dataset -> {(method, student, teacher): {source: top1}}
    for row in published_rows(path):
        key = (row["method"], row["student"], row["teacher"])
        by_source = numbers[row["dataset"]].setdefault(key, {})
        if row["source"] in by_source:
            raise ValueError(f"{path}: a second {row['source']} number for {row['dataset']} {key}")
        by_source[row["source"]] = row["top1"]
    published = {}
    for dataset, rows in numbers.items():
        sources = {source for by_source in rows.values() for source in by_source}
        if sources == {"seed zoo"}:
            published[dataset] = {key: next(iter(by_source.values())) for key, by_source in rows.items()}
        else:
            published[dataset] = {key: tuple(by_source.get(s) for s in SOURCES) for key, by_source in rows.items()}
    return published


PUBLISHED = read_published()


def variant(args):
    """What sets a KD run apart from its method's defaults ('kd weight 0.1, T 2'), or ''; for a run with
    --logit-stand, from the settings that switch brings for its pair."""
    method = args.get("method")
    if method not in METHODS:
        return ""
    defaults = {"kd_weight": default_weight(method, args["dataset"]), "ce_weight": METHODS[method].default_ce_weight,
                **default_hyperparameters(method)}
    if args.get("logit_stand"):
        defaults.update(logit_stand=True, **METHODS[method].logit_stand_defaults(args["teacher_arch"], args["model"]))
    return ", ".join(f"{key.replace('_', ' ')} {args[key]:g}" if isinstance(args[key], float) else
                     f"{key.replace('_', ' ')} {args[key]}"
                     for key, default in defaults.items() if key in args and args[key] != default)


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
        # a logit-standardised run is its own method in the table and in the published numbers
        method = args.get("method", "baseline") + ("+ls" if args.get("logit_stand") else "")
        changed = variant(args)
        runs.append({"folder": folder, "dataset": args["dataset"], "method": method, "variant": changed,
                     "label": f"{method} ({changed})" if changed else method, "epochs": args["epochs"],
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
    """Rows of the table: one per (data set, epochs, method label, model, teacher), baselines first."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["epochs"], run["label"], run["model"], run["teacher"])].append(run)
    baselines = {(d, epochs, model): mean_std([r["last"] for r in g])[0]
                 for (d, epochs, label, model, _), g in groups.items() if label == "baseline"}
    table = []
    order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "baseline"))
    for (dataset, epochs, label, model, teacher), group in order:
        method, changed = group[0]["method"], group[0]["variant"]
        last, best = mean_std([r["last"] for r in group]), mean_std([r["best"] for r in group])
        base = baselines.get((dataset, epochs, model))
        published = PUBLISHED.get(dataset, {}).get((method, model, None if method == "baseline" else teacher))
        comparable = not changed and epochs >= RECIPES[dataset]["epochs"]
        table.append({"dataset": dataset, "epochs": epochs, "method": method, "variant": changed, "label": label,
                      "model": model, "teacher": teacher, "runs": group, "comparable": comparable,
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
        if published and not row["comparable"]:
            published += " (not comparable)"
        note = f" ({row['incomplete']} incomplete)" if row["incomplete"] else ""
        gain = "–" if row["gain"] is None else f"{row['gain']:+.2f}"
        lines.append(
            f"| {row['dataset']} | {row['epochs']} | {row['label']} | {row['model']} | {row['teacher'] or '–'} | "
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
        fig, ax = plt.subplots(figsize=(9, 6))
        colours = plt.get_cmap("tab20").colors  # distinct for up to 20 lines, where the default cycle has 10
        for i, row in enumerate(table):
            epochs = min(len(r["rows"]) for r in row["runs"])
            curve = [statistics.fmean(r["rows"][e][key] for r in row["runs"]) for e in range(epochs)]
            # the baseline stands out; a method's variant (another weight) is dashed
            style = ({"color": "black", "linewidth": 2.5} if row["method"] == "baseline" else
                     {"color": colours[i % len(colours)], "linestyle": "--" if row["variant"] else "-"})
            ax.plot(range(1, epochs + 1), curve, label=f"{row['label']} {row['model']} ({row['dataset']})", **style)
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
