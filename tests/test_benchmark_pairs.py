"""Every method on every pair of the CRD benchmark (models.CRD_BENCHMARK_PAIRS): one training step
each, and the refusals exactly those the README names."""
import os

import pytest
import torch

from conftest import ROOT
from kd_losses import METHODS
from models import CRD_BENCHMARK_PAIRS, build_model
from engine import Teacher
from test_losses import train_one_step

pytestmark = pytest.mark.slow


# the pairs of the CRD benchmark a method refuses, as the README says: fsp those of unequal widths
REFUSED = {("fsp", teacher, student) for teacher, student in (
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))}


def test_the_readme_says_which_benchmark_pairs_a_method_refuses():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert f"Every method trains on all {len(CRD_BENCHMARK_PAIRS)} pairs" in readme
    assert f"but `fsp` on the {len(REFUSED)} whose widths differ at some stage" in readme
    assert {(t, s) for _, t, s in REFUSED} <= set(CRD_BENCHMARK_PAIRS)


@pytest.mark.parametrize("teacher_arch, student_arch", CRD_BENCHMARK_PAIRS,
                         ids=[f"{t}-{s}" for t, s in CRD_BENCHMARK_PAIRS])
def test_every_method_trains_a_step_on_every_benchmark_pair(teacher_arch, student_arch):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    teacher = Teacher(build_model(teacher_arch, 100))
    refused = {m for m, t, s in REFUSED if (t, s) == (teacher_arch, student_arch)}
    for name in METHODS:
        student = build_model(student_arch, 100)
        if name in refused:
            with pytest.raises(ValueError):
                train_one_step(name, student, teacher, 100, batch=4)
        else:
            train_one_step(name, student, teacher, 100, batch=4)
