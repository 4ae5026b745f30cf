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
