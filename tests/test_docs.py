"""docs/methods.md is generated from the method registry and docs/published.csv; these tests keep the
three in step (no training, no data)."""
import os

import pytest

import report
from conftest import ROOT, load_make_docs
from kd_losses import METHODS
from models import MODELS


def test_methods_md_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        written = f.read()
    assert written == load_make_docs().render(), (
        "docs/methods.md is out of date with the method registry or docs/published.csv: "
        "run `python docs/make_docs.py` and commit the result")


@pytest.mark.parametrize("name", ["README.md", "docs/operations.md"])
def test_generated_parts_are_up_to_date(name):
    """The counts and lists that come from the registries (methods, the teacher cache's methods, DKD's
    beta per pair, the models) are generated, so that they cannot drift."""
    make_docs = load_make_docs()
    path = os.path.join(ROOT, name)
    with open(path, encoding="utf-8") as f:
        written = f.read()
    assert written == make_docs.with_generated_parts(path, written), (
        f"{name}'s generated parts are out of date with the registries: run `python docs/make_docs.py`")
    served = [m for m, cls in METHODS.items() if not cls.teacher_cache_refusal()]
    assert "`, `".join(served[:-1]) + f"` and `{served[-1]}`" in written
    if name == "README.md":
        assert f"{len(METHODS)} methods: `logits`" in written
    else:
        assert all(f"| `{model}` |" in written for model in MODELS)
        assert "| `resnet20` | 272,474 / 278,324 | 3 |" in written


def test_render_is_deterministic_and_lists_every_method_and_flag():
    make_docs = load_make_docs()
    text = make_docs.render()
    assert text == make_docs.render()
    for name, cls in METHODS.items():
        assert f"| `{name}` | {cls.paper} |" in text
        for (teacher, student), settings in cls.settings_by_pair.items():  # the settings per pair table
            assert f"| `{name}` | {teacher} → {student} | {make_docs.setting_text(settings)} |" in text
        for key in cls.hyperparameters:
            assert "--" + key.replace("_", "-") in text
    assert "| `dkd` | resnet56 → resnet20 | beta 2 |" in text and "| `dkd` | resnet32x4 → resnet8x4 |" not in text


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_documents_itself(name):
    cls = METHODS[name]
    assert cls.paper and cls.summary and cls.weight_source, f"{name}: set paper, summary and weight_source"
    assert bool(cls.stage) == cls.has_stage, f"{name}: `stage` must be set exactly when has_stage is True"
    for attr in ("summary", "weight_source", "stage", "deviations"):
        value = getattr(cls, attr)
        assert isinstance(value, str) and "\n" not in value and value == value.strip(), f"{name}.{attr}"


def test_published_numbers_come_from_the_csv():
    assert report.PUBLISHED_CSV == os.path.join(ROOT, "docs", "published.csv")
    c10, c100 = report.PUBLISHED["cifar10"], report.PUBLISHED["cifar100"]
    assert set(report.PUBLISHED) == {"cifar10", "cifar100"}
    assert c10[("st", "resnet20", "resnet110")] == 92.82
    assert c10[("baseline", "resnet110", None)] == 93.86
    assert c10[("sp", "resnet20", "resnet110")] == 93.3
    assert c100[("crd", "resnet8x4", "resnet32x4")] == (None, 75.51)
    assert c100[("baseline", "resnet20", None)] == (68.92, 69.06)
    assert c100[("dkd", "wrn_16_2", "wrn_40_2")] == (None, 76.23)
    assert c100[("logits", "resnet20", "resnet110")] == (69.78, None)
    assert ("dkd", "resnet20", "resnet110") not in c100
    assert all(isinstance(v, float) for v in c10.values())
    assert all(isinstance(v, tuple) and len(v) == 2 for v in c100.values())
    assert c100[("crd", "MobileNetV2", "vgg13")] == (None, 69.73)
    assert c100[("dkd", "ShuffleV1", "resnet32x4")] == (None, 76.45)
    assert c100[("dist", "resnet8x4", "resnet32x4")] == (None, 76.31)
    assert c100[("reviewkd", "resnet8x4", "resnet32x4")] == (None, 75.63)
    assert c100[("dkd+ls", "resnet8x4", "resnet32x4")] == (None, 77.01)
    # the logit standardisation README's four pairs outside RepDistiller's table, KD to MLKD+LS
    assert c100[("st+ls", "wrn_16_2", "resnet32x4")] == (None, 75.26)
    assert c100[("mlkd+ls", "MobileNetV2", "wrn_40_2")] == (None, 71.61)
    assert c100[("dkd", "resnet8x4", "wrn_40_2")] == (None, 75.56)
    assert (len(c10), len(c100)) == (23, 298)


def test_published_csv_rejects_an_unknown_source_and_a_duplicate(tmp_path):
    header = "dataset,method,student,teacher,source,top1\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "cifar10,st,resnet20,resnet110,my notes,90.00\n")
    with pytest.raises(ValueError, match="my notes"):
        report.read_published(str(bad))
    twice = tmp_path / "twice.csv"
    twice.write_text(header + "cifar10,st,resnet20,resnet110,seed zoo,90.00\n" * 2)
    with pytest.raises(ValueError, match="second seed zoo"):
        report.read_published(str(twice))
