import pytest
import torch

from models import MODELS, build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,shortcut,expected", [
    ("resnet20", "projection", 272_474), ("resnet20", "identity", 269_722),
    ("resnet110", "projection", 1_730_714), ("resnet110", "identity", 1_727_962)])
def test_parameter_counts(name, shortcut, expected):
    assert count(build_model(name, 10, shortcut)) == expected


def test_registry_has_the_family():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} <= set(MODELS)
    for name in MODELS:
        depth = int(name[len("resnet"):])
        blocks = sum(len(stage) for stage in build_model(name, 10).stages)
        assert 2 * blocks + 2 == depth  # two convolutions per block, plus the stem and the classifier


@pytest.mark.parametrize("shortcut", ["projection", "identity"])
def test_logits_and_features(shortcut):
    model = build_model("resnet20", 100, shortcut)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 100)
    logits2, feats = model(x, features=True)
    assert torch.equal(logits, logits2)
    expected = {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage1_pre": (16, 32, 32),
                "stage2": (32, 16, 16), "stage2_pre": (32, 16, 16), "stage3": (64, 8, 8),
                "stage3_pre": (64, 8, 8), "pool": (64,)}
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    assert model.feature_channels == {k: v[0] for k, v in expected.items()}
    for i in (1, 2, 3):  # post-ReLU stage outputs are the ReLU of the pre-ReLU ones
        assert torch.equal(feats[f"stage{i}"], torch.relu(feats[f"stage{i}_pre"]))
        assert (feats[f"stage{i}_pre"] < 0).any()
    assert torch.allclose(feats["pool"], feats["stage3"].mean((2, 3)))
    assert torch.allclose(model.fc(feats["pool"]), logits)


def test_identity_shortcut_pads_channels_with_zeros():
    block = build_model("resnet8", 10, "identity").stages[1][0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert not out[:, 16:].any()


def test_bad_depth_is_refused():
    from models.resnet import CifarResNet
    with pytest.raises(ValueError):
        CifarResNet(21, 10)
