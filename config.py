"""Every setting of a run, in one place: the defaults and recipes (edit them here), the flags of
train_base.py and train_kd.py, and resolve(), which turns the flags into one frozen Config.

Where a value comes from, first match wins:
  1. a resumed run (--resume): the run's own config, saved in its last.pt; only the flags in
     MAY_CHANGE_ON_RESUME may differ from it
  2. the flag, when typed
  3. for the recipe flags: the method's official recipe where it has its own (KDMethod.official_recipe),
     then the network's LR where the data set's recipe sets another for it (LR_BY_MODEL), then the
     recipe of the data set (RECIPES)
  4. the method's own default for the pair (kd_losses/<method>.py), for --kd-weight and the method's flags
  5. DEFAULTS
Every parser default is None, so a flag that is not None was typed: no second parse is needed.
"""
import argparse
import os

import torch

from data import DATASETS, PADDINGS
from kd_losses import METHODS, default_hyperparameters, default_weight
from models import MODELS, SHORTCUTS
from engine.checkpoint import file_sha256, import_teacher, load_checkpoint
from utils import UserError, fraction, log, non_negative, positive, seed_value

# ---------------------------------------------------------------------------------------------
# Defaults: edit these (or pass the flag) to change a run.
# ---------------------------------------------------------------------------------------------

# Per data set: CIFAR-10 as the seed zoo trains it (He et al. 2016's schedule, reflection padding),
# CIFAR-100 as the CRD benchmark (RepDistiller) does. padding: how the 4 pixels around an image are
# filled before the random 32x32 crop.
RECIPES = {
    "cifar10": dict(epochs=200, lr_milestones=[100, 150], batch_size=128, lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=1e-4, padding="reflect"),
    "cifar100": dict(epochs=240, lr_milestones=[150, 180, 210], batch_size=64, lr=0.05,
                     momentum=0.9, nesterov=False, weight_decay=5e-4, padding="zeros"),
}
# Per data set, the networks its recipe trains at another LR, as teachers and as students:
# RepDistiller's MobileNetV2, ShuffleV1 and ShuffleV2 at 0.01 on CIFAR-100 (train_student.py L92-94,
# train_teacher.py L54-56; mdistiller's configs for these students agree)
LR_BY_MODEL = {"cifar100": {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}}

DEFAULTS = dict(
    dataset="cifar10",       # train_kd.py: the teacher's
    model="resnet20",        # --model in train_base.py, --student in train_kd.py
    shortcut="projection",   # where a block changes shape: 1x1 conv + BN ("identity": the paper's zero padding)
    lr_gamma=0.1,            # LR factor at each milestone
    seed=0,
    val_split=0,             # training images held out to choose the best epoch; 0: chosen on the test set
    val_file=None,           # a CIFAR batch file of validation images (instead of --val-split)
    drop_last=False,         # True: each epoch's last, smaller batch is left out (the official codes keep it)
    eval_every=1,            # epochs between evaluations (and the last epoch's); the best epoch is among them
    data_root="./dataset",
    output_dir=None,         # None: runs/<data set>-<model(s)>-seed<seed>
    device="auto",           # auto: CUDA when available, else the CPU
    amp=None,                # None: bf16 on CUDA, off on the CPU
    channels_last=None,      # None: on for CUDA
    compile=False,
    sync_bn=False,
    deterministic=False,     # deterministic algorithms: bit-exact resume on CUDA too, somewhat slower there
    resume=None,
    # train_kd.py only
    ce_weight=1.0,
    kd_weight=None,          # None: the method's own default weight
    stage_cache=None,        # folder that keeps stage results (FT, AB, FSP) across runs; None: none kept
    teacher_cache="auto",    # the teacher's outputs on every view, computed once (engine/teacher_cache.py)
    teacher_cache_dir=None,  # where teacher caches are kept; None: beside the teacher checkpoint
)

# settings that say where a run lives or how fast it goes, not what it computes; a run's identity
# (run_identity) is every other setting, the data and the teacher entering by their contents
# (data_sha256, teacher_sha256) rather than by their paths
NOT_IN_IDENTITY = ("device", "data_root", "val_file", "output_dir", "resume", "teacher", "channels_last", "compile",
                   "deterministic", "stage_cache", "teacher_cache", "teacher_cache_dir")
# flags that may differ from the run being resumed: those, how long it trains, and its precision (a
# run may move between a CPU and a GPU)
MAY_CHANGE_ON_RESUME = NOT_IN_IDENTITY + ("epochs", "amp")
# settings added since runs were first saved, with the value that a run saved before them trained with
ADDED_SINCE = {"padding": "zeros", "drop_last": False, "eval_every": 1}
KD_ONLY = ("teacher", "method", "ce_weight", "kd_weight", "stage_cache", "teacher_cache", "teacher_cache_dir")


class Config(argparse.Namespace):
    """The resolved settings of a run: read them as attributes; they cannot be changed."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is frozen: {name} is set in config.resolve()")

    def __delattr__(self, name):
        raise AttributeError(f"the config is frozen: {name} is set in config.resolve()")


def get_args_parser(script):
    """The parser of train_base.py (script 'base') or train_kd.py ('kd'). Defaults are shown in
    the help but applied by resolve(), so that a value that is not None was typed."""
    kd = script == "kd"
    parser = argparse.ArgumentParser(
        description=("Train a student with a KD loss from a teacher checkpoint." if kd else
                     "Train a CIFAR network with cross-entropy (a teacher, or a baseline student)."),
        # one line above an error message, not every flag: --help lists them
        usage="%(prog)s --teacher T --student S --method M [options]" if kd else "%(prog)s [--model M] [options]",
        allow_abbrev=False)
    if kd:
        parser.add_argument("--teacher", required=True, help="checkpoint written by train_base.py (or by "
                            "RepDistiller or mdistiller, with --teacher-arch)")
        parser.add_argument("--teacher-arch", choices=list(MODELS), help="the architecture of a --teacher written "
                            "by RepDistiller or mdistiller, converted once into ours (NAME.kdzoo.pt beside it); "
                            "needs --dataset")
        parser.add_argument("--method", choices=list(METHODS), required=True, help="KD method (docs/methods.md)")
    parser.add_argument("--dataset", choices=list(DATASETS),
                        help="data set (default: " + ("the teacher's)" if kd else "cifar10)"))
    parser.add_argument("--student" if kd else "--model", dest="model", choices=list(MODELS),
                        help=f"architecture to train (default: {DEFAULTS['model']})")
    parser.add_argument("--shortcut", choices=SHORTCUTS, help="where a block changes shape: 1x1 conv + BN "
                        "(projection), or the paper's zero padding (identity) (default: projection)")
    recipe = parser.add_argument_group("recipe (a flag left out takes the data set's entry in config.RECIPES)")

    def recipe_flag(flag, help_text, **kwargs):
        key = flag[2:].replace("-", "_")
        defaults = ", ".join(f"{name}: {values[key]}" for name, values in RECIPES.items())
        recipe.add_argument(flag, help=f"{help_text} (default: {defaults})", **kwargs)
    recipe_flag("--epochs", "epochs to train", type=positive(int))
    recipe_flag("--batch-size", "images per step", type=positive(int))
    recipe_flag("--lr", "initial learning rate", type=positive(float))
    recipe_flag("--lr-milestones", "epochs after which the LR is multiplied by --lr-gamma; with --epochs "
                "alone, the recipe's scaled to it", type=positive(int), nargs="+")
    recipe.add_argument("--lr-gamma", type=positive(float), help="LR decay factor at each milestone (default: 0.1)")
    recipe_flag("--momentum", "SGD momentum", type=fraction)
    recipe_flag("--weight-decay", "L2 weight decay", type=non_negative(float))
    recipe_flag("--nesterov", "Nesterov momentum", action=argparse.BooleanOptionalAction)
    recipe_flag("--padding", "how the random crop's 4-pixel border is filled", choices=PADDINGS)
    parser.add_argument("--seed", type=seed_value, help="fixes every random source (default: 0)")
    parser.add_argument("--val-split", type=non_negative(int),
                        help="training images held out (class-balanced) to choose the best epoch; "
                             "0 chooses it on the test set (default: 0)")
    parser.add_argument("--val-file", metavar="FILE",
                        help="a batch file in the data set's official python format (a dict of uint8 'data', "
                             "N x 3072, and 'labels', or 'fine_labels' for CIFAR-100) holding validation images "
                             "that are neither training nor test images: the best epoch is chosen on them")
    parser.add_argument("--drop-last", action=argparse.BooleanOptionalAction,
                        help="leave out each epoch's last batch when it is smaller than --batch-size: PKT and "
                             "SP take a step many times larger on a small one (the official codes keep it) "
                             "(default: off)")
    parser.add_argument("--eval-every", type=positive(int), metavar="N",
                        help="evaluate on the test and validation images every N epochs and at the last one; "
                             "the best epoch is chosen among those (default: 1)")
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ or cifar-100-python/ "
                                            "(default: ./dataset)")
    parser.add_argument("--output-dir", help="where the run's files go (default: a folder under runs/ "
                                             "named after the data set, model(s) and seed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available, else the CPU (default: auto)")
    speed = parser.add_argument_group("speed (results change only by floating-point rounding)")
    speed.add_argument("--amp", choices=["bf16", "off"],
                       help="bf16 autocast, losses in fp32 (default: bf16 on CUDA, off on the CPU)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="NHWC memory layout (default: on for CUDA)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the training step and the teacher's forward (CUDA graphs on "
                            "CUDA) (default: off)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                        help="under torchrun on CUDA: BN statistics over the global batch (default: off)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                        help="deterministic algorithms only, so that a resumed run equals an uninterrupted "
                             "one bit for bit on CUDA too (exact on the CPU without it) (default: off)")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue the run in this last.pt; auto: the one in --output-dir, if any")
    if kd:
        parser.add_argument("--kd-weight", type=non_negative(float),
                            help="weight of the KD loss (default: the method's own, docs/methods.md)")
        parser.add_argument("--ce-weight", type=non_negative(float),
                            help="weight of the cross-entropy loss (default: 1.0)")
        parser.add_argument("--stage-cache", metavar="DIR",
                            help="keep the results of a method's stage (FT, AB, FSP) in DIR and reuse them "
                                 "in later runs with the same teacher, student, seed, data and settings "
                                 "(default: none kept outside the run folder)")
        cache = parser.add_argument_group(
            "teacher cache (the teacher's logits and pooled vector on all 162 crop/flip views of every "
            "training image, computed once; results change only by floating-point rounding)")
        cache.add_argument("--teacher-cache", choices=["auto", "on", "off"],
                           help="on: build or load it (for methods that read only those outputs); auto: use it "
                                "when one exists for this teacher and data, or build it when that costs fewer "
                                "teacher forwards than the run (from 162 epochs on); off: run the teacher at "
                                "every step (default: auto)")
        cache.add_argument("--teacher-cache-dir", metavar="DIR",
                           help="where teacher caches are kept and looked for (default: beside the teacher "
                                "checkpoint)")
        add_method_flags(parser)
    return parser


def add_method_flags(parser):
    """Every method's hyper-parameters as --flags, one group per method (a flag shared by several
    methods, such as --T, shows each one's default)."""
    users = {}  # flag -> the methods that read it
    for name, cls in METHODS.items():
        for key in cls.hyperparameters:
            users.setdefault(key, []).append(name)
    added = set()
    for name, cls in METHODS.items():
        fresh = {k: v for k, v in cls.hyperparameters.items() if k not in added}
        if not fresh:
            continue
        group = parser.add_argument_group(f"--method {name}")
        for key, spec in fresh.items():
            default, help_text = spec[:2]
            kind = spec[2] if len(spec) > 2 else type(default)  # a default of None names its type
            if len(users[key]) > 1:
                shown = " (default: " + ", ".join(f"{m} {METHODS[m].hyperparameters[key][0]}" for m in users[key]) + ")"
            else:
                shown = "" if default is None else f" (default: {default})"
            if kind is bool:  # a switch, off unless given
                group.add_argument(f"--{key.replace('_', '-')}", dest=key, action="store_true", default=None,
                                   help=help_text)
            else:
                group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=positive(kind),
                                   help=help_text + shown)
            added.add(key)


def resolve(args, script):
    """(Config, resume) from parsed flags: resume is (checkpoint, path) of the last.pt to continue,
    or None. Every check that needs no data or network happens here, before anything is written
    (but a --teacher-arch teacher's conversion, which is written beside its source once checked)."""
    typed = {key: value for key, value in vars(args).items() if value is not None}
    values = {key: value for key, value in DEFAULTS.items() if script == "kd" or key not in KD_ONLY}
    values.update(typed)
    if script == "kd":
        refuse_other_methods_flags(values["method"], typed)
        if "teacher_arch" in typed:
            typed["teacher"] = values["teacher"] = imported_teacher(values["teacher"], typed["teacher_arch"],
                                                                    typed.get("dataset"))
        values.update(teacher_fields(values["teacher"], typed.get("dataset")))
    values = {key: value for key, value in values.items() if not is_method_flag(key)}
    if values["output_dir"] is None:
        models = values["model"] if script == "base" else \
            f"{values['method']}-{values['teacher_arch']}-to-{values['model']}"
        values["output_dir"] = os.path.join("runs", f"{values['dataset']}-{models}-seed{values['seed']}")
    resume = find_resume(values["resume"], values["output_dir"], script)
    official = {}
    if resume:
        values = adopt_saved(values, typed, *resume)
    else:
        if script == "kd":
            official = METHODS[values["method"]].official_recipe(values["dataset"], values["teacher_arch"],
                                                                 values["model"], bool(typed.get("logit_stand")))
        values.update(recipe_values(values["dataset"], typed, values["model"], official))
    log(("recipe (the resumed run's): " if resume else "recipe: ") + ", ".join(
        f"{key.replace('_', ' ')} {values[key]}" + ("" if resume else recipe_source(key, typed, official, values))
        for key in RECIPES[values["dataset"]]))
    if values["val_file"] and values["val_split"]:
        raise UserError("--val-file and --val-split both name validation images; give one of them.")
    if values["val_file"] and not os.path.isfile(values["val_file"]):
        raise UserError(f"--val-file {values['val_file']} does not exist.")
    late = [m for m in values["lr_milestones"] if m >= values["epochs"]]
    if late:
        log(f"note: the LR milestone(s) {late} are at or past the last epoch ({values['epochs']}), so they never "
            f"lower the LR")
    if script == "kd":
        values.update(method_values(values, typed, new_run=resume is None))
        if values["kd_weight"] == 0 and values["ce_weight"] == 0:
            why = "" if "ce_weight" in typed else f" (--method {values['method']} trains with CE weight 0 unless given)"
            raise UserError(f"A KD weight of 0 and a CE weight of 0 leave nothing to train{why}; give --kd-weight "
                            f"or --ce-weight a positive value.")
        if values["sync_bn"] and METHODS[values["method"]].double_backward:
            raise UserError(f"--sync-bn cannot run --method {values['method']}: it differentiates through a "
                            f"gradient, and SyncBatchNorm's backward cannot be differentiated again.")
        refusal = METHODS[values["method"]].teacher_cache_refusal()
        if values["teacher_cache"] == "on" and refusal:
            raise UserError(f"--teacher-cache on cannot serve --method {values['method']}: {refusal}; use "
                            f"--teacher-cache auto or off.")
        values["teacher_sha256"] = file_sha256(values["teacher"])
        if resume and values["teacher_sha256"] != resume[0]["config"]["teacher_sha256"]:
            raise UserError(f"{values['teacher']} is not the teacher of the run in {resume[1]} "
                            f"(its contents differ).")
    values.update(speed_values(values))
    return Config(**values), resume


def with_data(cfg, data_sha256, resume):
    """The config with the loaded data's sha256 (data.data_sha256), a part of the run's identity. A
    resumed run continues on the data it was trained on (the same arrays in any folder): other data is
    refused, since its best epoch would then be chosen across different test sets."""
    saved = resume[0]["config"].get("data_sha256") if resume else None
    if resume and saved is None:
        log(f"note: the run in {resume[1]} was saved before runs recorded their data, so this resume cannot "
            f"check that {cfg.data_root} holds the same images")
    elif saved is not None and saved != data_sha256:
        raise UserError(f"The data in {cfg.data_root}{' and ' + cfg.val_file if cfg.val_file else ''} is not the "
                        f"data the run in {resume[1]} was trained on (its training, test or validation images or "
                        f"labels differ); resume it on that data, or start a new run in another --output-dir.")
    return Config(**{**vars(cfg), "data_sha256": data_sha256})


def run_identity(settings):
    """What decides a run's results: its settings (a Config's, or a saved args.json's), but those that
    say only where it lives or how fast it goes (NOT_IN_IDENTITY); a run saved before a setting of
    ADDED_SINCE existed has the value it trained with. Two runs with the same identity are the same
    experiment; sweep.py and report.py compare runs by it."""
    return {**ADDED_SINCE, **{key: value for key, value in settings.items() if key not in NOT_IN_IDENTITY}}


def is_method_flag(key):
    return any(key in cls.hyperparameters for cls in METHODS.values())


def teacher_fields(path, dataset):
    """The data set (the teacher's unless given) and the teacher's architecture, checked against each other."""
    ckpt = load_checkpoint(path)
    if ckpt.get("predictor", "student") != "student":
        raise UserError(f"The teacher {path} is a --method {ckpt['kd']['method']} student, which predicts through "
                        f"its method's parts rather than its own classifier, so it cannot teach.")
    dataset = dataset or ckpt["dataset"]
    if ckpt["dataset"] != dataset:
        raise UserError(f"The teacher {path} was trained on {ckpt['dataset']}, not on {dataset}.")
    if ckpt["num_classes"] != DATASETS[dataset].num_classes:
        raise UserError(f"The teacher {path} has {ckpt['num_classes']} classes but "
                        f"{dataset} has {DATASETS[dataset].num_classes}.")
    return {"dataset": dataset, "teacher_arch": ckpt["arch"]}


def imported_teacher(path, arch, dataset):
    """--teacher-arch: the path of a RepDistiller/mdistiller teacher converted into our checkpoint format."""
    if dataset is None:
        raise UserError("--teacher-arch needs --dataset: a RepDistiller or mdistiller checkpoint does not record "
                        "its data set.")
    return import_teacher(path, arch, dataset, DATASETS[dataset].num_classes)


def recipe_values(dataset, typed, model, official=None, quiet=False):
    """The recipe flags left out: from `official` (a method's official recipe), else LR_BY_MODEL for the
    model, else RECIPES[dataset]; with --epochs alone, the recipe's milestones scaled to it (and a note
    says so, unless quiet), an official recipe's epochs and milestones then left out."""
    recipe = RECIPES[dataset]
    official = {key: value for key, value in (official or {}).items()
                if "epochs" not in typed or key not in ("epochs", "lr_milestones")}
    defaults = {**recipe, "lr": LR_BY_MODEL.get(dataset, {}).get(model, recipe["lr"]), **official}
    values = {key: typed.get(key, default) for key, default in defaults.items()}
    if "lr_milestones" not in typed and "epochs" in typed and typed["epochs"] != recipe["epochs"]:
        scale = typed["epochs"] / recipe["epochs"]
        values["lr_milestones"] = sorted({max(1, round(m * scale)) for m in recipe["lr_milestones"]})
        if not quiet:
            log(f"note: --epochs {typed['epochs']} without --lr-milestones: the recipe's milestones "
                f"{recipe['lr_milestones']} scaled to {values['lr_milestones']}")
    if sorted(set(values["lr_milestones"])) != values["lr_milestones"]:
        raise UserError(f"--lr-milestones must increase strictly, got {values['lr_milestones']}.")
    return values


def recipe_source(key, typed, official, values):
    """Where a new run's recipe setting comes from, for the log: '' for the data set's recipe."""
    if key in typed:
        return " (given)"
    if key in official:
        return f" (--method {values['method']}'s official recipe)"
    if key == "lr" and values["model"] in LR_BY_MODEL.get(values["dataset"], {}):
        return f" ({values['model']}'s in the {values['dataset']} recipe)"
    return ""


def refuse_other_methods_flags(method, typed):
    own = METHODS[method].hyperparameters
    for key in typed:
        owners = [name for name, cls in METHODS.items() if key in cls.hyperparameters]
        if owners and key not in own:
            raise UserError(f"--{key.replace('_', '-')} belongs to --method {', '.join(owners)}, not to --method "
                            f"{method}.")


def method_values(values, typed, new_run):
    """The chosen method's hyper-parameters, KD weight and, in a new run, CE weight where values (a
    resumed run's) lack them: typed, else the method's defaults for the pair (with --logit-stand, the
    official ones under it)."""
    method = values["method"]
    defaults = default_hyperparameters(method, values["teacher_arch"], values["model"])
    chosen = {key: typed.get(key, default) for key, default in defaults.items() if key not in values}
    if values["kd_weight"] is None:
        chosen["kd_weight"] = default_weight(method, values["dataset"])
    if new_run and "ce_weight" not in typed:
        chosen["ce_weight"] = METHODS[method].default_ce_weight
    if chosen.get("logit_stand"):  # a new run with --logit-stand: the official settings under it, where not given
        settings = METHODS[method].logit_stand_defaults(values["teacher_arch"], values["model"])
        chosen.update({key: value for key, value in settings.items() if key not in typed})
    return chosen


def method_hyperparameters(cfg):
    """The chosen method's hyper-parameters, as its constructor takes them."""
    return {key: getattr(cfg, key) for key in METHODS[cfg.method].hyperparameters}


def speed_values(values):
    """--amp and --channels-last for the device, where not given; bf16 refused where it cannot run."""
    device = values["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch sees no CUDA device.")
    amp, channels_last = values["amp"], values["channels_last"]
    if amp is None:
        amp = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if channels_last is None:
        channels_last = device == "cuda"
    if values["sync_bn"] and device != "cuda":
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only.")
    if amp == "bf16":
        supported = (torch.cuda.is_bf16_supported() if device == "cuda"
                     else torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if not supported:
            raise UserError(f"--amp bf16 needs bf16 support, which this {device.upper()} lacks; use --amp off.")
    return {"amp": amp, "channels_last": channels_last}


def find_resume(resume, output_dir, script):
    """The (checkpoint, path) that --resume names, or None."""
    if resume is None:
        return None
    path = os.path.join(output_dir, "last.pt") if resume == "auto" else resume
    if resume == "auto" and not os.path.exists(path):
        log(f"--resume auto: {path} does not exist yet, so this is a new run")
        return None
    ckpt = load_checkpoint(path)
    if "history" not in ckpt:
        raise UserError(f"{path} is not a last.pt (it holds no optimizer state); resume from last.pt.")
    if ("kd" in ckpt) != (script == "kd"):
        written_by = "train_kd.py" if "kd" in ckpt else "train_base.py"
        raise UserError(f"{path} was written by {written_by}; resume it with {written_by}.")
    return ckpt, path


def adopt_saved(values, typed, ckpt, path):
    """The saved config of the run in `path`, with the typed flags that may change on resume. A typed
    flag that would change the run is an error; one that may change is kept, and a note says so."""
    saved = {**ADDED_SINCE, **{key: value for key, value in ckpt["config"].items() if key != "resume"}}
    if "method" in saved:  # runs saved before settings per pair were resolved here hold None for them
        pair = default_hyperparameters(saved["method"], saved["teacher_arch"], saved["model"])
        saved.update({key: value for key, value in pair.items() if key in saved and saved[key] is None})
    for key, mine in typed.items():
        if key not in MAY_CHANGE_ON_RESUME and key in saved and mine != saved[key]:
            raise UserError(f"--{key.replace('_', '-')} {mine} differs from {saved[key]} in the run in {path}; "
                            f"start a new run (another --output-dir) to change it.")
    adopted = dict(saved)
    for key in MAY_CHANGE_ON_RESUME:
        if key in typed:
            if key in saved and typed[key] != saved[key]:
                kept = f"; its LR milestones {saved['lr_milestones']} are kept" if key == "epochs" else ""
                log(f"note: resuming with --{key.replace('_', '-')} {typed[key]} (the run had {saved[key]}){kept}")
            adopted[key] = typed[key]
    if "device" in typed and typed["device"] != saved.get("device"):
        for key in ("amp", "channels_last"):  # the new device's defaults, unless given
            adopted[key] = typed.get(key)
    adopted["resume"] = values["resume"]
    adopted["output_dir"] = typed.get("output_dir", os.path.dirname(os.path.abspath(path)))
    for key, value in values.items():  # settings added since that checkpoint was written
        adopted.setdefault(key, value)
    if adopted["epochs"] < ckpt["epoch"]:
        raise UserError(f"--epochs {adopted['epochs']} is fewer than the {ckpt['epoch']} epochs {path} already holds.")
    return adopted
