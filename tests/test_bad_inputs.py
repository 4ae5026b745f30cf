"""Every user mistake we could think of: one sentence on stderr, a non-zero exit, nothing written."""
import os
import shutil

import pytest

import train_base
import train_kd
from conftest import assert_user_error, run_script

BASE_FLAGS = [
    ("--epochs", "ten"), ("--epochs", "0"), ("--epochs", "-3"), ("--batch-size", "1.5"), ("--batch-size", "0"),
    ("--lr", "fast"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "inf"), ("--lr", "nan"),
    ("--lr-milestones", "x"), ("--lr-milestones", "0"), ("--lr-gamma", "-1"), ("--momentum", "1.0"),
    ("--momentum", "-0.5"), ("--weight-decay", "-1e-4"), ("--seed", "-1"), ("--seed", "one"),
    ("--val-split", "-5"), ("--dataset", "cifar1000"), ("--model", "resnet19"), ("--shortcut", "none"),
    ("--device", "gpu"), ("--val-split", "0.1"), ("--resume", None), ("--lr-milestones", None),
]
KD_FLAGS = [("--kd-weight", "-1"), ("--kd-weight", "heavy"), ("--ce-weight", "nan"), ("--T", "0"),
            ("--p", "-2"), ("--ft-k", "0"), ("--ft-epochs", "1.5"), ("--w-dist", "x"), ("--w-angle", "-50"),
            ("--cc-order", "2.5"), ("--crd-negatives", "0"), ("--dkd-beta", "-8"), ("--bss-steps", "ten")]


def parse_error(parser, argv, capsys):
    """argparse's verdict in-process (a subprocess per flag would only add start-up time)."""
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag,value", BASE_FLAGS)
def test_bad_base_flag(flag, value, capsys):
    message = parse_error(train_base.get_args_parser(), [flag] + ([value] if value else []), capsys)
    assert "error: argument" in message and flag in message, message


def test_bad_flag_through_the_script(cifar10_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--epochs", "0",
                      check=False, subprocess_=True)  # a real process: its exit status and stderr
    assert_user_error(proc, "--epochs", "must be a positive integer, got 0")
    assert proc.returncode == 2 and not out.exists()


@pytest.mark.parametrize("flag,value", KD_FLAGS)
def test_bad_kd_flag(flag, value, capsys):
    message = parse_error(train_kd.get_args_parser(), ["--teacher", "t.pt", "--method", "st", flag, value], capsys)
    assert "error: argument" in message and flag in message, message


@pytest.mark.parametrize("script", [train_base, train_kd], ids=["train_base", "train_kd"])
def test_help_shows_every_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    flags = [a.option_strings[0] for a in script.get_args_parser()._actions if a.option_strings]
    assert flags and all(flag in shown for flag in flags)
    if script is train_kd:  # every method's flags, a shared one with each method's default
        assert len([f for f in flags if f not in train_base.get_args_parser()._option_string_actions]) > 30
        assert "(default: st 4.0, bss 3.0, dkd 4.0, dist 4.0, nkd 3.0, mlkd 4.0)" in " ".join(shown.split())


@pytest.mark.parametrize("script", [train_base, train_kd], ids=["train_base", "train_kd"])
def test_a_flag_argparse_cannot_parse_gets_a_one_line_usage_and_the_error(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args([*(("--teacher", "t.pt", "--method", "st") if script is train_kd else ()),
                                             "--bogus", "1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: ") and lines[1].endswith("unrecognized arguments: --bogus 1")


def test_missing_required_kd_flags(capsys):
    assert "--teacher" in parse_error(train_kd.get_args_parser(), ["--method", "st"], capsys)
    assert "--method" in parse_error(train_kd.get_args_parser(), ["--teacher", "t.pt"], capsys)


def copy_with(tmp_path, cifar10_root, name, content):
    root = tmp_path / "data"
    shutil.copytree(cifar10_root, root)
    (root / "cifar-10-batches-py" / name).write_bytes(content)
    return root


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95"], ids=["empty", "truncated"])
def test_broken_data_file(content, cifar10_root, tmp_path):
    root = copy_with(tmp_path, cifar10_root, "data_batch_3", content)
    proc = run_script("train_base.py", "--data-root", root, "--output-dir", tmp_path / "run", check=False)
    assert_user_error(proc, "data_batch_3", "not a readable CIFAR python batch")
    assert not (tmp_path / "run").exists()


def test_batch_of_the_wrong_kind(cifar10_root, tmp_path):
    import pickle
    root = copy_with(tmp_path, cifar10_root, "test_batch", pickle.dumps({"images": [1, 2, 3]}))
    proc = run_script("train_base.py", "--data-root", root, "--output-dir", tmp_path / "run", check=False)
    assert_user_error(proc, "test_batch", "KeyError")


@pytest.mark.parametrize("layout", ["inner-folder", "other-dataset", "empty"])
def test_data_folder_with_the_wrong_layout(layout, cifar10_root, cifar100_root, tmp_path):
    root, dataset, expected = {
        "inner-folder": (os.path.join(cifar10_root, "cifar-10-batches-py"), "cifar10", "the folder above it"),
        "other-dataset": (cifar10_root, "cifar100", "cifar-100-python"),
        "empty": (str(tmp_path), "cifar10", "could not be downloaded"),
    }[layout]
    proc = run_script("train_base.py", "--data-root", root, "--dataset", dataset, "--output-dir",
                      tmp_path / "run", check=False)
    assert_user_error(proc, expected)
    assert not (tmp_path / "run").exists()


def test_output_dir_that_cannot_be_written(cifar10_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", blocker / "run",
                      "--epochs", 1, check=False)
    assert_user_error(proc, "Cannot write to the output folder", "a-file")


def test_teacher_of_the_other_dataset_even_with_matching_flags(cifar100_root, cifar10_root, tmp_path):
    out = tmp_path / "t100"
    run_script("train_base.py", "--dataset", "cifar100", "--data-root", cifar100_root, "--output-dir", out,
               "--model", "resnet8", "--epochs", 1, "--batch-size", 100)
    proc = run_script("train_kd.py", "--teacher", out / "last.pt", "--method", "st", "--dataset", "cifar10",
                      "--data-root", cifar10_root, "--output-dir", tmp_path / "run", check=False)
    assert_user_error(proc, "trained on cifar100, not on cifar10")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# The probe list: every bad input we know of, each one `error:` line, exit status 2 and nothing
# written (no output folder, no file below the probes' folder changed).

def write_batch(path, data, labels, label_key="labels"):
    import pickle
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: labels}, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory, cifar10_root, teacher):
    """What the probes need: data folders with bad arrays, a run to resume, a SimKD student, a file
    where a folder should be."""
    import pickle

    import numpy as np
    root = tmp_path_factory.mktemp("probes")
    folder = os.path.join(cifar10_root, "cifar-10-batches-py")

    def variant(name, file, data=None, labels=None):
        copy = root / "data" / name
        shutil.copytree(cifar10_root, copy)
        with open(os.path.join(folder, file), "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        write_batch(copy / "cifar-10-batches-py" / file, entry["data"] if data is None else data(entry["data"]),
                    entry["labels"] if labels is None else labels(entry["labels"]))
        return copy
    roots = {
        "hwc": variant("hwc", "data_batch_2", data=lambda d: d.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)),
        "float-pixels": variant("float-pixels", "data_batch_1", data=lambda d: d.astype(np.float32) / 255),
        "float-labels": variant("float-labels", "data_batch_4", labels=lambda y: [float(v) + 0.5 for v in y]),
        "label-10": variant("label-10", "test_batch", labels=lambda y: [10] + list(y[1:])),
        "empty-test": variant("empty-test", "test_batch", data=lambda d: d[:0], labels=lambda y: []),
        "other-test-image": variant("other-test-image", "test_batch", data=lambda d: 255 - d),
    }
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        images = pickle.load(f, encoding="latin1")
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        test = pickle.load(f, encoding="latin1")
    val_files = {"val": root / "val_batch", "val-other": root / "val_batch_other", "val-test": root / "test_as_val"}
    write_batch(val_files["val"], 255 - images["data"], images["labels"])
    write_batch(val_files["val-other"], 254 - images["data"], images["labels"])
    write_batch(val_files["val-test"], test["data"], test["labels"])
    runs = root / "runs"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", runs / "base", "--model", "resnet8",
               "--epochs", 1, "--batch-size", 40)
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", runs / "base-val", "--model", "resnet8",
               "--epochs", 1, "--batch-size", 40, "--val-file", val_files["val"])
    run_script("train_kd.py", "--teacher", teacher, "--method", "simkd", "--data-root", cifar10_root,
               "--output-dir", runs / "simkd", "--student", "resnet8", "--epochs", 1, "--batch-size", 40)
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    return {"root": root, "data": cifar10_root, "teacher": teacher, "runs": runs, "blocker": blocker, **roots,
            **val_files}


def kd(w, *args):
    return ("train_kd.py", "--teacher", w["teacher"], "--data-root", w["data"], "--student", "resnet8",
            "--epochs", 1, "--batch-size", 40, *args)


def base(w, *args, data="data"):
    return ("train_base.py", "--data-root", w[data], "--model", "resnet8", "--epochs", 1, "--batch-size", 40, *args)


# (id, the command from the world, fragments of the one error line); every command gets --output-dir
# unless it resumes
PROBES = [
    # data arrays that would train on wrong images or labels
    ("pixels-stored-hwc", lambda w: base(w, data="hwc"), ["data_batch_2", "uint8 of shape (40, 32, 32, 3)",
                                                          "(N, 3072)"]),
    ("float-pixels", lambda w: base(w, data="float-pixels"), ["data_batch_1", "float32", "(N, 3072)"]),
    ("float-labels", lambda w: base(w, data="float-labels"), ["data_batch_4", "float64", "integer labels"]),
    ("label-out-of-range", lambda w: base(w, data="label-10"), ["test_batch", "outside 0..9"]),
    ("empty-test-batch", lambda w: base(w, data="empty-test"), ["test_batch", "holds no images"]),
    ("missing-data", lambda w: ("train_base.py", "--data-root", w["root"] / "nowhere"), ["could not be downloaded"]),
    # resume
    ("resume-on-other-data", lambda w: base(w, "--resume", w["runs"] / "base" / "last.pt", "--epochs", 2,
                                            data="other-test-image"),
     ["is not the data the run in", "was trained on"]),
    ("resume-on-other-validation-images", lambda w: base(w, "--resume", w["runs"] / "base-val" / "last.pt",
                                                         "--epochs", 2, "--val-file", w["val-other"]),
     ["is not the data the run in", "validation images"]),
    ("resume-with-another-lr", lambda w: base(w, "--resume", w["runs"] / "base" / "last.pt", "--lr", 0.2),
     ["--lr 0.2 differs from 0.1"]),
    ("resume-best-pt", lambda w: base(w, "--resume", w["runs"] / "base" / "best.pt"), ["not a last.pt"]),
    ("run-folder-holds-a-run", lambda w: base(w, "--output-dir", w["runs"] / "base"), ["already holds a run"]),
    # validation images
    ("val-file-and-val-split", lambda w: base(w, "--val-file", w["val"], "--val-split", 10),
     ["--val-file and --val-split both name validation images"]),
    ("val-file-missing", lambda w: base(w, "--val-file", w["root"] / "nowhere"), ["--val-file", "does not exist"]),
    ("val-file-holds-test-images", lambda w: base(w, "--val-file", w["val-test"]),
     ["40 of the 40 images in --val-file", "are also test images", "must be neither"]),
    ("val-file-of-another-layout", lambda w: base(w, "--val-file", w["hwc"] / "cifar-10-batches-py" / "data_batch_2"),
     ["uint8 of shape (40, 32, 32, 3)"]),
    # flags
    ("seed-2-to-the-64", lambda w: base(w, "--seed", 2 ** 64), ["--seed", "from 0 to 2^64 - 1"]),
    ("mistyped-flag", lambda w: base(w, "--epoch", 3), ["unrecognized arguments: --epoch"]),
    ("other-methods-flag", lambda w: kd(w, "--method", "st", "--ft-k", 0.5), ["--ft-k belongs to --method ft"]),
    ("nothing-to-optimise", lambda w: kd(w, "--method", "st", "--kd-weight", 0, "--ce-weight", 0),
     ["nothing to train"]),
    ("nothing-to-optimise-simkd", lambda w: kd(w, "--method", "simkd", "--kd-weight", 0),
     ["nothing to train", "simkd trains with CE weight 0"]),
    ("kdsvd-k-above-the-map-width", lambda w: kd(w, "--method", "kdsvd", "--kdsvd-k", 9),
     ["--kdsvd-k 9 is more than the 8 singular vectors"]),
    ("teacher-cache-on-for-a-method-that-cannot", lambda w: kd(w, "--method", "at", "--teacher-cache", "on"),
     ["--teacher-cache on cannot serve --method at"]),
    # teachers and folders
    ("simkd-student-as-teacher", lambda w: kd(w, "--method", "st", "--teacher", w["runs"] / "simkd" / "last.pt"),
     ["is a --method simkd student", "cannot teach"]),
    ("teacher-missing", lambda w: kd(w, "--method", "st", "--teacher", w["root"] / "nope.pt"), ["does not exist"]),
    ("teacher-cache-folder-unwritable", lambda w: kd(w, "--method", "st", "--teacher-cache", "on",
                                                     "--teacher-cache-dir", w["blocker"] / "caches"),
     ["Cannot write to the teacher cache folder"]),
    ("stage-cache-folder-unwritable", lambda w: kd(w, "--method", "ft", "--ft-epochs", 1, "--stage-cache",
                                                   w["blocker"] / "stages"), ["Cannot write to the stage cache"]),
    ("output-folder-unwritable", lambda w: base(w, "--output-dir", w["blocker"] / "run"),
     ["Cannot write to the output folder"]),
    # evaluate.py
    ("evaluate-missing-checkpoint", lambda w: ("evaluate.py", w["root"] / "nope.pt"), ["does not exist"]),
    ("evaluate-class-count", lambda w: ("evaluate.py", w["runs"] / "base" / "last.pt", "--dataset", "cifar100"),
     ["has 10 classes but cifar100 has 100"]),
    ("evaluate-arch-without-dataset", lambda w: ("evaluate.py", w["teacher"], "--arch", "resnet8"),
     ["--arch needs --dataset"]),
]


def snapshot(root):
    return {os.path.join(folder, name): (os.path.getsize(os.path.join(folder, name)),
                                         os.path.getmtime(os.path.join(folder, name)))
            for folder, _, files in os.walk(root) for name in files}


@pytest.mark.parametrize("name,command,fragments", PROBES, ids=[p[0] for p in PROBES])
def test_probe(name, command, fragments, world):
    script, *args = command(world)
    out = world["root"] / "out" / name
    if script != "evaluate.py" and "--output-dir" not in args and "--resume" not in args:
        args += ["--output-dir", out]
    before = snapshot(world["root"])
    proc = run_script(script, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert_user_error(proc, *fragments)
    assert not out.exists()
    assert snapshot(world["root"]) == before  # nothing written anywhere (args.json, caches, converted files)
