"""Turn a folder of runs into a Markdown results table (mean ± std over seeds) and training curves.

    python report.py runs/sweep-cifar10-resnet110-to-resnet20            # writes report.md there
    python report.py RUNS --output results.md --no-plots

A run is any folder below RUNS holding args.json and metrics.csv (written by train_base.py or
train_kd.py; a folder whose files cannot be read is skipped with a note naming it). A row holds the
runs of one identity (config.run_identity: every setting that changes results, the data's and the
teacher's contents included) over their seeds, so runs made with other settings never share a row.
A row is labelled with its method ('baseline' for train_base.py) and whatever differs from the
method's and the recipe's defaults, e.g. 'rkd (kd weight 0.1)' or 'baseline (lr 0.02)'; rows that
would still read alike add the settings in which they differ (e.g. 'data 3f2a9c01d4e5'). Two runs
of one identity and seed are duplicates: the first folder's is reported, and the others are listed
under the table. Each row gives, over its seeds: the last-epoch test top-1, the best-epoch test
top-1 (the epoch chosen on the validation images when the runs had them, else on the test set
itself, and the column says which), the gain of the last-epoch mean over the baseline with the same
settings, the published number where there is one (marked as not comparable unless the row has the
settings it was trained with, for at least as many epochs), and the mean wall time per run (its
median epoch's time times its epochs, evaluated epochs and the others apart: a paused epoch does
not count; stages and the teacher cache's build are left out). The report ends with the number of
runs read, tuning runs included, and their training time in all, measured so.
Standard deviations are sample ones (n - 1); a gain's ± is its standard error,
sqrt(s^2/n + s_baseline^2/n_baseline). A run that stopped on non-finite values (diverged.json) is
counted in its row's note; one that stopped on an error (its log.txt, which a sweep's runs write,
ends with an 'error:' line), diverged ones with no saved epoch included, is listed under the table
with that line.
When RUNS holds sweep.py's tuning.json (sweep.py --tune), a summary gives each method on one line,
its default-weight and tuned rows side by side (or the error that stopped it), and a table each
method's tuning runs (validation top-1, and test top-1 for comparison only), the weight chosen on
the validation images, and how well the validation images' ranking agrees with the test images';
the chosen weight's row is labelled 'tuned', and the tuning runs of the weights not chosen appear
there only.
Plots (need matplotlib): gains.png, each method's gain over the baseline with its standard error,
sorted (a gain far below the others, a run that collapsed, at the axis's end with its value);
test_top1.png and train_loss.png, per epoch, mean over seeds, for the baseline and the rows with
the best last-epoch top-1.
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections import defaultdict

from config import DEFAULTS, KD_ONLY, RECIPES, recipe_values, run_identity
from engine import DIVERGED
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


# what a KD run's identity holds that a baseline's does not: a KD row's baseline is the baseline run
# whose identity equals the KD run's without these (and without the seed)
KD_SETTINGS = set(KD_ONLY) | {"teacher_arch", "teacher_sha256"} | {
    key for cls in METHODS.values() for key in cls.hyperparameters}


def official_recipe(args):
    """The recipe settings a KD run's method trains its pair with where they are not the data set's
    recipe (KDMethod.official_recipe); {} for a baseline and most methods."""
    method = args.get("method")
    if method not in METHODS:
        return {}
    return METHODS[method].official_recipe(args["dataset"], args.get("teacher_arch"), args["model"],
                                           bool(args.get("logit_stand")))


def defaults_for(args):
    """The settings a run of this data set, epoch count, method and pair gets from no flag: the recipe's
    (the network's LR where the recipe sets another, the method's official recipe where it has one, the
    milestones scaled to the epochs), the shortcut and LR factor, and a KD run's method defaults for
    its pair (with --logit-stand, the settings that switch brings for it)."""
    dataset, epochs, method = args["dataset"], args["epochs"], args.get("method")
    official = official_recipe(args)
    typed = {} if official.get("epochs", RECIPES[dataset]["epochs"]) == epochs else {"epochs": epochs}
    defaults = {key: DEFAULTS[key] for key in ("shortcut", "lr_gamma")}
    defaults.update(recipe_values(dataset, typed, args["model"], official, quiet=True))
    if method in METHODS:
        defaults.update(kd_weight=default_weight(method, dataset), ce_weight=METHODS[method].default_ce_weight,
                        **default_hyperparameters(method, args.get("teacher_arch"), args["model"]))
        if args.get("logit_stand"):
            defaults.update(logit_stand=True,
                            **METHODS[method].logit_stand_defaults(args["teacher_arch"], args["model"]))
    return defaults


def setting(key, value):
    """'kd weight 0.1', 'lr milestones 5 8', 'data 3f2a9c01d4e5' (a sha256 cut to 12 digits), 'data
    unrecorded' (a run saved before the setting was recorded)."""
    name = key.replace("_sha256", "").replace("_", " ")
    if value is None:
        value = "unrecorded"
    elif isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, list):
        value = " ".join(map(str, value))
    elif isinstance(value, str) and len(value) == 64:
        value = value[:12]
    return f"{name} {value}"


def differences(args):
    """What sets a run apart from the defaults of its data set, epochs, model and method, in words ('kd
    weight 0.1', 'T 2'); for a run with --logit-stand, from the settings that switch brings for its pair."""
    return [setting(key, args[key]) for key, default in defaults_for(args).items()
            if key in args and args[key] != default]


def variant(args):
    """differences(args) joined, after what the run took from its method's official recipe, where the
    method has one other than the data set's ('official recipe: lr 0.025, T 2'), or ''."""
    used = {key: value for key, value in official_recipe(args).items() if args.get(key) == value}
    official = ["official recipe: " + ", ".join(setting(key, value) for key, value in used.items())] if used else []
    return ", ".join(official + differences(args))


def comparable(args):
    """Whether a published number was trained with this run's settings: those of its method and recipe,
    for at least as many epochs."""
    # --drop-last labels no row (it is one setting of a whole sweep), but no published run left a batch out
    return not differences(args) and not args.get("drop_last") and \
        args["epochs"] >= official_recipe(args).get("epochs", RECIPES[args["dataset"]]["epochs"])


def read_runs(root):
    """One dict per run folder below root: its args, identity, metrics rows and derived numbers. A
    folder whose args.json or metrics.csv cannot be read is skipped, with a note naming it."""
    runs = []
    for folder, _, files in sorted(os.walk(root)):
        if "args.json" not in files or "metrics.csv" not in files:
            continue
        try:
            with open(os.path.join(folder, "args.json")) as f:
                args = json.load(f)
            with open(os.path.join(folder, "metrics.csv")) as f:
                # an empty cell: an epoch not evaluated (--eval-every)
                rows = [{k: None if v == "" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            changed, published_setting = variant(args), comparable(args)
            identity = {k: v for k, v in run_identity(args).items() if k != "seed"}
            seed, epochs, model = args["seed"], args["epochs"], args["model"]
            diverged = None
            if os.path.exists(os.path.join(folder, DIVERGED)):
                with open(os.path.join(folder, DIVERGED)) as f:
                    diverged = json.load(f)["epoch"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            print(f"note: {folder} is left out: its args.json or metrics.csv cannot be read ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        if not rows:
            continue
        selector = "val_top1" if "val_top1" in rows[0] else "test_top1"
        evaluated = [row for row in rows if row["test_top1"] is not None]
        if not evaluated:
            continue
        best = max(evaluated, key=lambda r: r[selector])  # the first epoch with the highest score
        # a logit-standardised run is its own method in the table and in the published numbers
        method = args.get("method", "baseline") + ("+ls" if args.get("logit_stand") else "")
        runs.append({"folder": folder, "dataset": args["dataset"], "method": method, "variant": changed,
                     "kd_method": args.get("method"), "kd_weight": args.get("kd_weight"), "diverged": diverged,
                     "val_top1": evaluated[-1].get("val_top1"),
                     "comparable": published_setting,
                     "label": f"{method} ({changed})" if changed else method, "epochs": epochs,
                     "model": model, "teacher": args.get("teacher_arch"), "seed": seed, "identity": identity,
                     "complete": len(rows) >= epochs, "rows": rows, "last": evaluated[-1]["test_top1"],
                     "best": best["test_top1"], "selected_on": selector[:-5],
                     "seconds": wall_time(rows, epochs)})
    return runs


def wall_time(rows, epochs):
    """A run's seconds for `epochs` epochs: per kind of epoch (evaluated or not, --eval-every), the
    median epoch's time times their number, so that an epoch slowed by a pause (kill -STOP, a
    suspended laptop) does not count."""
    kinds = defaultdict(list)
    for row in rows:
        kinds[row["test_top1"] is not None].append(row["seconds"])
    share = epochs / len(rows)  # an unfinished run: what all its epochs would take
    return sum(statistics.median(seconds) * len(seconds) * share for seconds in kinds.values())


def failed_runs(root):
    """[(folder, the error line that ended it)] for every run folder below root whose log.txt (a
    sweep's runs write one) ends with an 'error:' line, as a run that could not go on does; a run
    that diverged after a saved epoch is left out (its row counts it)."""
    failed = []
    for folder, _, files in sorted(os.walk(root)):
        if DIVERGED in files and "metrics.csv" in files:
            with open(os.path.join(folder, "metrics.csv")) as f:
                if len(f.read().strip().splitlines()) > 1:
                    continue
        if "log.txt" in files:
            with open(os.path.join(folder, "log.txt"), errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            if lines and lines[-1].startswith("error:"):
                failed.append((folder, lines[-1]))
    return failed


def mean_std(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean, std):
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def summarise(runs):
    """Rows of the table: one per identity (over seeds), baselines first. A second run of one identity
    and seed is a duplicate: left out of the row and listed in its 'duplicates'."""
    groups = defaultdict(list)
    for run in runs:
        groups[identity_key(run["identity"])].append(run)
    groups = {key: group for key, group in groups.items() if any(r.get("role") != "grid" for r in group)}
    labels = distinct_labels(groups)
    baselines = {key: ([r["last"] for r in unique(group)[0]], labels[key])
                 for key, group in groups.items() if group[0]["method"] == "baseline"}
    table = []
    order = sorted(groups, key=lambda key: (groups[key][0]["dataset"], groups[key][0]["epochs"],
                                            groups[key][0]["method"] != "baseline", labels[key]))
    for key in order:
        group, duplicates = unique(groups[key])
        first = group[0]
        dataset, epochs, method, model, teacher = (first[k] for k in
                                                   ("dataset", "epochs", "method", "model", "teacher"))
        changed = first["variant"]
        last, best = mean_std([r["last"] for r in group]), mean_std([r["best"] for r in group])
        base, base_label = baselines.get(
            identity_key({k: v for k, v in first["identity"].items() if k not in KD_SETTINGS}), (None, None))
        gain = None if base is None or method == "baseline" else \
            (last[0] - statistics.fmean(base), standard_error([r["last"] for r in group], base))
        published = PUBLISHED.get(dataset, {}).get((method, model, None if method == "baseline" else teacher))
        table.append({"dataset": dataset, "epochs": epochs, "method": method, "variant": changed, "label": labels[key],
                      "model": model, "teacher": teacher, "runs": group, "comparable": first["comparable"],
                      "seeds": sorted(r["seed"] for r in group), "last": last, "best": best,
                      "gain": gain, "baseline": None if gain is None else base_label,
                      "diverged": sum(r["diverged"] is not None for r in group),
                      "selected_on": "/".join(sorted({r["selected_on"] for r in group})),
                      "published": published, "seconds": statistics.fmean(r["seconds"] for r in group),
                      "incomplete": sum(not r["complete"] for r in group), "duplicates": duplicates})
    return table


def standard_error(values, baseline):
    """The standard error of mean(values) - mean(baseline); None unless both have two values or more."""
    if len(values) < 2 or len(baseline) < 2:
        return None
    return math.sqrt(statistics.variance(values) / len(values) + statistics.variance(baseline) / len(baseline))


def identity_key(identity):
    """An identity (without the seed) as a dict key."""
    return json.dumps(identity, sort_keys=True)


def unique(group):
    """(the group's runs with one per seed, the first folder's; [(duplicate folder, kept folder)])."""
    kept, duplicates = {}, []
    for run in sorted(group, key=lambda r: r["folder"]):
        if run["seed"] in kept:
            duplicates.append((run["folder"], kept[run["seed"]]["folder"]))
        else:
            kept[run["seed"]] = run
    return list(kept.values()), duplicates


def distinct_labels(groups):
    """A label per group: its first run's, and where groups of the same data set, epochs, model and
    teacher would read alike, the settings in which their identities differ."""
    alike = defaultdict(list)
    for key, group in groups.items():
        run = group[0]
        alike[(run["dataset"], run["epochs"], run["label"], run["model"], run["teacher"])].append(key)
    labels = {}
    for keys in alike.values():
        identities = [groups[key][0]["identity"] for key in keys]
        differing = sorted({k for identity in identities for k in identity
                            if len({json.dumps(i.get(k)) for i in identities}) > 1})
        for key, identity in zip(keys, identities):
            run = groups[key][0]
            extra = ", ".join(setting(k, identity.get(k)) for k in differing)
            labels[key] = run["label"] if len(keys) == 1 else \
                f"{run['method']} ({', '.join(filter(None, [run['variant'], extra]))})"
    return labels


def read_tuning(root):
    """sweep.py's tuning.json in root, or None."""
    path = os.path.join(root, "tuning.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def apply_tuning(runs, tuning):
    """Marks each run of a tuned method (same identity but the KD weight) with its role: 'default',
    'tuned' (the chosen weight, when not the default; labelled so) or 'grid' (a weight not chosen)."""
    for run in runs:
        entry = tuning["methods"].get(run["kd_method"])
        if entry is None or entry["identity"] != {k: v for k, v in run["identity"].items() if k != "kd_weight"}:
            continue
        run["role"] = "default" if run["kd_weight"] == entry["default"] else \
            "tuned" if run["kd_weight"] == entry["chosen"] else "grid"
        if run["role"] == "tuned":
            run["variant"] = ", ".join(filter(None, [run["variant"], "tuned"]))
            run["label"] = f"{run['method']} ({run['variant']})"


def tuning_rows(runs, tuning, root):
    """Per tuned method: (method, default, chosen, [(weight, validation top-1 or None, test top-1 or None)])."""
    by_folder = {os.path.normpath(run["folder"]): run for run in runs}
    rows = []
    for method, entry in sorted(tuning["methods"].items()):
        tried = []
        for item in entry["runs"]:
            run = by_folder.get(os.path.normpath(os.path.join(root, item["folder"])))
            test = None if run is None or run["diverged"] is not None else run["last"]
            tried.append((item["kd_weight"], item["val_top1"], test))
        rows.append((method, entry["default"], entry["chosen"], sorted(tried)))
    return rows


def spearman(xs, ys):
    """Spearman's rank correlation (ties get their mean rank); None for fewer than 2 pairs or a constant."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        rank = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                rank[order[k]] = (i + j) / 2
            i = j + 1
        return rank
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def tuning_markdown(rows, tuning):
    lines = [f"KD weights tuned on validation images: each method trained at its default weight and around it on "
             f"seed {tuning['seed']}; the weight with the best {tuning['selected_on']} was chosen (**bold**) and "
             f"trained on every seed. Test top-1 (last epoch) of the same runs is shown for comparison only: it "
             f"chose nothing.", "",
             "| method | default weight | weight: validation top-1 (test top-1) | chosen |", "|---|---|---|---|"]
    agree, complete, rhos, pooled = 0, 0, [], []
    for method, default, chosen, tried in rows:
        cells = []
        for weight, val, test in tried:
            score = "diverged" if val is None else f"{val:.2f} ({'–' if test is None else f'{test:.2f}'})"
            cells.append(f"**{weight:g}**: {score}" if weight == chosen else f"{weight:g}: {score}")
        chosen_text = chosen_cell(chosen, [weight for weight, _, _ in tried])
        lines.append(f"| {method} | {default:g} | {' · '.join(cells)} | {chosen_text} |")
        scored = [(val, test) for _, val, test in tried if val is not None and test is not None]
        if chosen is None or len(scored) < len(tried) or len(tried) < 2:  # no ranking to compare
            continue
        complete += 1
        agree += max(test for _, test in scored) == next(test for w, _, test in tried if w == chosen)
        rho = spearman(*zip(*scored))
        if rho is not None:
            rhos.append(rho)
        pooled += scored
    if complete:
        text = (f"Validation against test: the weight chosen on the validation images is also the best on the "
                f"test images for {agree} of {complete} methods (those with two weights or more, every run "
                f"finished)")
        if rhos:
            text += (f"; Spearman's rank correlation of validation and test top-1 within a method's runs, "
                     f"averaged over {len(rhos)} methods: {statistics.fmean(rhos):.2f}")
        rho = spearman(*zip(*pooled))
        if rho is not None:
            text += f"; over all {len(pooled)} of those runs together: {rho:.2f}"
        lines += ["", text + "."]
    return "\n".join(lines) + "\n"


def chosen_cell(chosen, weights):
    """The chosen weight, and whether it is the smallest or largest of the `weights` tried: the best may
    then lie beyond them."""
    if chosen is None:
        return "none (every run diverged)"
    weights = sorted(weights)
    if len(weights) > 1 and chosen in (weights[0], weights[-1]):
        return f"{chosen:g} (the {'smallest' if chosen == weights[0] else 'largest'} tried)"
    return f"{chosen:g}"


def method_summary_markdown(table, failed, tuning):
    """One line per KD method: its default-weight row and its tuned row side by side, methods with the
    larger gain first; a method without a finished default-weight run gives its runs' error instead."""
    rows = defaultdict(dict)
    for row in table:
        role = row["runs"][0].get("role")
        if role in ("default", "tuned"):
            rows[row["method"]][role] = row
        elif row["method"] != "baseline" and not row["variant"]:  # not tuned: one of its tuning runs failed
            rows[row["method"]].setdefault("default", row)
    errors = defaultdict(list)
    for folder, error in failed:  # sweep.py names a run's folder after its method first
        errors[os.path.basename(os.path.normpath(folder)).split("-")[0]].append(error)
    baseline = next((row for row in table if row["method"] == "baseline" and not row["variant"]), None)
    seeds = len(baseline["seeds"]) if baseline else None

    def cells(row):
        if row is None:
            return "not run", "–"
        note = "" if len(row["seeds"]) == seeds else f" ({len(row['seeds'])} seed{'s' * (len(row['seeds']) > 1)})"
        note += f" ({row['incomplete']} incomplete)" if row["incomplete"] else ""  # a report made mid-sweep
        gain = "–" if row["gain"] is None else f"{row['gain'][0]:+.2f}" + \
            ("" if row["gain"][1] is None else f" ± {row['gain'][1]:.2f}")
        if row["gain"] is not None and (baseline is None or row["baseline"] != baseline["label"]):
            gain += f" (over {row['baseline']})"  # the baseline trained with the row's own recipe
        return fmt(*row["last"]) + note, gain

    def order(method):
        gains = [row["gain"][0] for row in rows[method].values() if row["gain"] is not None]
        return -max(gains) if gains else math.inf, method

    over = "" if baseline is None else f" ({fmt(*baseline['last'])})"
    lines = [f"Each method at its default KD weight and at the weight tuned on validation images: last-epoch "
             f"test top-1, mean ± std over {seeds or '?'} seed{'s' * (seeds != 1)} unless marked, and the gain over "
             f"the baseline{over} ± its standard error.", "",
             "| method | default weight | top-1 | gain | tuned weight | top-1 | gain | wall time per run |",
             "|---|---|---|---|---|---|---|---|"]
    for method in sorted(set(tuning["methods"]) | {m for m in errors if m in METHODS}, key=order):
        entry, default = tuning["methods"].get(method), rows[method].get("default")
        weight = f"{entry['default']:g}" if entry else "–"
        if default is None:
            why = errors[method][0] if errors[method] else "no finished run"
            lines.append("| " + " | ".join([method, weight, why.replace("|", "/")] + [""] * 5) + " |")
            continue
        if entry is None:
            tuned = ("none: a tuning run failed", "", "")
        elif entry["chosen"] is None:
            tuned = ("none: every tuning run diverged", "", "")
        elif len(entry["runs"]) < 2:  # FSP and AB distil in their stage, at KD weight 0
            tuned = ("nothing to tune", "", "")
        elif entry["chosen"] == entry["default"]:
            tuned = (f"{entry['chosen']:g} (the default)", "=", "=")
        else:
            tuned = (chosen_cell(entry["chosen"], [run["kd_weight"] for run in entry["runs"]]),
                     *cells(rows[method].get("tuned")))
        lines.append(f"| {default['label']} | {weight} | {' | '.join(cells(default))} | {' | '.join(tuned)} | "
                     f"{default['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def markdown(table, failed=()):
    chosen_on = {row["selected_on"] for row in table}
    lines = ["Best epochs were chosen on " + ("the validation images (val); the test images chose nothing."
                                            if chosen_on == {"val"} else
                                            "the test images where the column says (test): those best-epoch "
                                            "numbers are optimistic; the others on validation images (val)."), "",
             "| data set | epochs | method | student | teacher | seeds | last-epoch top-1 | best-epoch top-1 "
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
        note += f" ({row['diverged']} diverged)" if row.get("diverged") else ""
        note += f" ({len(row['duplicates'])} duplicate left out)" if row.get("duplicates") else ""
        gain = "–" if row["gain"] is None else f"{row['gain'][0]:+.2f}" + \
            ("" if row["gain"][1] is None else f" ± {row['gain'][1]:.2f}")
        lines.append(
            f"| {row['dataset']} | {row['epochs']} | {row['label']} | {row['model']} | {row['teacher'] or '–'} | "
            f"{','.join(map(str, row['seeds']))}{note} | {fmt(*row['last'])} | {fmt(*row['best'])} "
            f"({row['selected_on']}) | {gain} | "
            f"{published or '–'} | {row['seconds'] / 60:.1f} min |")
    duplicates = [pair for row in table for pair in row.get("duplicates", ())]
    if duplicates:
        lines += ["", "Duplicates (the same settings and seed as a reported run; left out of the table):", ""]
        lines += [f"- {folder} (the same run as {kept})" for folder, kept in duplicates]
    if failed:
        lines += ["", "Runs that stopped on an error (the last line of their log.txt):", ""]
        lines += [f"- {folder}: {error}" for folder, error in failed]
    return "\n".join(lines) + "\n"


def training_time_line(runs):
    """The training time of every run read (tuning runs and duplicates too): what the report cost."""
    hours = sum(run["seconds"] for run in runs) / 3600
    return (f"In all: {len(runs)} runs, {hours:.1f} hours of training (the sum of their wall times, "
            f"measured as in the table).\n")


def gain_lines(table):
    """[(label, {role: row})] for gains.png, sorted by the larger gain: a tuned method's default-weight
    and tuned rows share its line; any other row with a gain has a line of its own."""
    lines = {}
    for row in table:
        if row["gain"] is None:
            continue
        role = row["runs"][0].get("role")
        if role in ("default", "tuned"):
            lines.setdefault(row["method"], [row["method"], {}])[1][role] = row
            if role == "tuned":
                lines[row["method"]][0] = f"{row['method']} (tuned: kd weight {row['runs'][0]['kd_weight']:g})"
        else:
            lines[row["label"]] = [row["label"], {"default": row}]
    return sorted(((label, rows) for label, rows in lines.values()),
                  key=lambda line: max(row["gain"][0] for row in line[1].values()))


def gain_axis_left(gains):
    """The left end of gains.png's axis: down to the lowest gain, unless that lies beyond twice the
    highest gain (at least 10 points) below zero; then there, rounded to 5 points, so that a run that
    collapsed does not squeeze every other gain into a corner (it is drawn at the end, its gain
    written beside it). None: the axis fits every gain."""
    limit = -5 * math.ceil(max(10.0, 2 * max(gains)) / 5)
    return limit if min(gains) < limit else None


def plot(table, folder, curves=6):
    """Writes gains.png (when a row has a gain) and test_top1.png and train_loss.png (the baseline and
    the `curves` rows with the best last-epoch top-1); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    lines = gain_lines(table)
    if lines:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(lines)))
        left = gain_axis_left([row["gain"][0] for _, rows in lines for row in rows.values()])
        for y, (_, rows) in enumerate(lines):
            for role, row in rows.items():
                gain, colour = row["gain"][0], "tab:green" if row["gain"][0] > 0 else "tab:red"
                style = {"facecolors": colour if role == "tuned" else "white", "edgecolors": colour,
                         "label": "tuned KD weight" if role == "tuned" else "default KD weight"}
                if left is not None and gain < left:  # off the axis: at its end, with its gain
                    ax.scatter(left, y, zorder=3, s=36, marker="<", **style)
                    ax.annotate(f"{gain:+.1f}", (left, y), xytext=(6, -3), textcoords="offset points", fontsize=7)
                    continue
                ax.errorbar(gain, y, xerr=row["gain"][1] or 0, fmt="none", ecolor="grey", capsize=3)
                ax.scatter(gain, y, zorder=3, s=36, marker="D" if role == "tuned" else "o", **style)
        handles = {label: handle for handle, label in zip(*ax.get_legend_handles_labels())}
        if "tuned KD weight" in handles:
            ax.legend(handles.values(), handles.keys(), fontsize=8, loc="lower right")
        ax.set_yticks(range(len(lines)), [label for label, _ in lines], fontsize=8)
        ax.axvline(0, color="black", linewidth=1)
        if left is not None:
            ax.set_xlim(left=left - 0.5)
        ax.set_xlabel("gain over the baseline, last-epoch test top-1 (points), ± standard error")
        ax.grid(axis="x", alpha=0.3)
        paths.append(os.path.join(folder, "gains.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    shown = [row for row in table if row["method"] == "baseline"] + sorted(
        (row for row in table if row["method"] != "baseline"), key=lambda row: -row["last"][0])[:curves]
    for key, label in (("test_top1", "test top-1 (%)"), ("train_loss", "training loss")):
        fig, ax = plt.subplots(figsize=(9, 6))
        colours = plt.get_cmap("tab10").colors
        for i, row in enumerate(shown):
            epochs = min(len(r["rows"]) for r in row["runs"])
            points = [(e + 1, statistics.fmean(r["rows"][e][key] for r in row["runs"])) for e in range(epochs)
                      if all(r["rows"][e][key] is not None for r in row["runs"])]  # the evaluated epochs
            # the baseline stands out; a method's variant (another weight) is dashed
            style = ({"color": "black", "linewidth": 2.5} if row["method"] == "baseline" else
                     {"color": colours[i % len(colours)], "linestyle": "--" if row["variant"] else "-"})
            ax.plot(*zip(*points), label=f"{row['label']} {row['model']} ({row['dataset']})", marker=".", **style)
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
    tuning = read_tuning(args.runs)
    if tuning:
        apply_tuning(runs, tuning)
    table = summarise(runs)
    failed = failed_runs(args.runs)
    text = markdown(table, failed)
    if tuning:
        text += "\n" + method_summary_markdown(table, failed, tuning)
        text += "\n" + tuning_markdown(tuning_rows(runs, tuning, args.runs), tuning)
    text += "\n" + training_time_line(runs)
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
