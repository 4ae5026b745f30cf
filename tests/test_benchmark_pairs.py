"""Every method on every pair of the CRD benchmark (models.CRD_BENCHMARK_PAIRS): one training step
each, and the refusals exactly those the README lists."""
import os
import re

import pytest
import torch

from conftest import ROOT
from kd_losses import METHODS
from models import CRD_BENCHMARK_PAIRS, build_model
from engine import Teacher
from test_losses import train_one_step

pytestmark = pytest.mark.slow


def refusals_in_readme():
    """{(method, teacher, student)} from the README's table of refused pairs: rows '| `method` | t → s, ... | why |'."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("Pairs a method refuses", 1)[1].split("\n\n", 2)[1]
    refused = set()
    for method, pairs in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M):
        for pair in pairs.split(","):
            teacher, student = (name.strip(" `") for name in pair.split("→"))
            refused.add((method, teacher, student))
    return refused


def test_the_readme_lists_refusals_of_benchmark_pairs_only():
    refused = refusals_in_readme()
    assert refused and {(t, s) for _, t, s in refused} <= set(CRD_BENCHMARK_PAIRS)
    assert {m for m, _, _ in refused} <= set(METHODS)


@pytest.mark.parametrize("teacher_arch, student_arch", CRD_BENCHMARK_PAIRS,
                         ids=[f"{t}-{s}" for t, s in CRD_BENCHMARK_PAIRS])
def test_every_method_trains_a_step_on_every_benchmark_pair(teacher_arch, student_arch):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    teacher = Teacher(build_model(teacher_arch, 100))
    refused = {m for m, t, s in refusals_in_readme() if (t, s) == (teacher_arch, student_arch)}
    for name in METHODS:
        student = build_model(student_arch, 100)
        if name in refused:
            with pytest.raises(ValueError):
                train_one_step(name, student, teacher, 100, batch=4)
        else:
            train_one_step(name, student, teacher, 100, batch=4)
