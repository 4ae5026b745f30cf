import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MODELS, build_model, fold_batchnorm


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,shortcut,expected", [
    ("resnet20", "projection", 272_474), ("resnet20", "identity", 269_722),
    ("resnet110", "projection", 1_730_714), ("resnet110", "identity", 1_727_962)])
def test_parameter_counts(name, shortcut, expected):
    assert count(build_model(name, 10, shortcut)) == expected


# sum(p.numel() for p in model.parameters()) of RepDistiller's models (models/__init__.py's model_dict) for 100 classes
REPDISTILLER_PARAMETERS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "vgg8": 3_965_028,
    "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692, "ResNet50": 23_705_252,
    "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528}


def test_parameter_counts_equal_repdistillers():
    assert set(MODELS) == set(REPDISTILLER_PARAMETERS)
    counts = {name: sum(p.numel() for p in build_model(name, 100).parameters()) for name in MODELS}
    assert counts == REPDISTILLER_PARAMETERS


def test_registry_has_the_family():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} <= set(MODELS)
    assert {"resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2"} <= set(MODELS)
    for name in MODELS:
        resnet, wrn = re.fullmatch(r"resnet(\d+)(x4)?", name), re.fullmatch(r"wrn_(\d+)_(\d+)", name)
        if not (resnet or wrn):
            continue  # the CRD benchmark's other families: their sizes are checked by the parameter counts
        depth = int((resnet or wrn).group(1))
        blocks = sum(len(stage) for stage in build_model(name, 10).stages)
        # two convolutions per block, plus the stem and the classifier (and a WRN's first-block 1x1 shortcuts)
        assert 2 * blocks + (2 if resnet else 4) == depth


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
                "stage3_pre": (64, 8, 8), "pre_pool": (64, 8, 8), "pool": (64,)}
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


# ---- the CRD benchmark's models: resnet8x4, resnet32x4, wrn_16_2, wrn_40_2 ----

def cifar_resnet_parameters(depth, num_classes, widths, stem, projection=True):
    """Hand count: 3x3 stem conv + BN; per block two 3x3 convs + two BNs, and a 1x1 conv + BN where a
    projection shortcut changes the shape; the classifier."""
    total, in_channels = 9 * 3 * stem + 2 * stem, stem
    for i, width in enumerate(widths):
        for b in range((depth - 2) // 6):
            c = in_channels if b == 0 else width
            total += 9 * c * width + 2 * width + 9 * width * width + 2 * width
            if projection and b == 0 and (i > 0 or c != width):
                total += c * width + 2 * width
        in_channels = width
    return total + widths[-1] * num_classes + num_classes


def wrn_parameters(depth, k, num_classes):
    """Hand count of a standard WRN: 3x3 stem conv (no BN of its own); per block BN(in), 3x3 conv
    in->out, BN(out), 3x3 conv out->out, and a 1x1 conv (no BN) where the shape changes; final BN; fc."""
    total, in_channels = 9 * 3 * 16, 16
    for width in (16 * k, 32 * k, 64 * k):
        for b in range((depth - 4) // 6):
            c = in_channels if b == 0 else width
            total += 2 * c + 9 * c * width + 2 * width + 9 * width * width + (c * width if c != width else 0)
        in_channels = width
    return total + 2 * in_channels + in_channels * num_classes + num_classes


def test_hand_count_matches_the_published_resnet_counts():
    # the formula's check against the counts asserted above for the 16/32/64 ResNets
    assert cifar_resnet_parameters(20, 10, (16, 32, 64), 16) == 272_474
    assert cifar_resnet_parameters(110, 10, (16, 32, 64), 16, projection=False) == 1_727_962


@pytest.mark.parametrize("name,num_classes,expected", [
    ("resnet8x4", 10, 1_210_410), ("resnet8x4", 100, 1_233_540),      # RepDistiller: 1.23M (CIFAR-100)
    ("resnet32x4", 10, 7_410_730), ("resnet32x4", 100, 7_433_860),    # 7.43M
    ("wrn_16_2", 10, 691_674), ("wrn_16_2", 100, 703_284),            # 0.70M
    ("wrn_40_2", 10, 2_243_546), ("wrn_40_2", 100, 2_255_156)])       # 2.26M
def test_crd_benchmark_parameter_counts(name, num_classes, expected):
    if name.startswith("wrn"):
        _, depth, k = name.split("_")
        assert wrn_parameters(int(depth), int(k), num_classes) == expected
    else:
        assert cifar_resnet_parameters(int(name[6:-2]), num_classes, (64, 128, 256), 32) == expected
    assert count(build_model(name, num_classes)) == expected


def test_x4_resnets_with_the_identity_shortcut_have_no_projections():
    for depth in (8, 32):
        expected = cifar_resnet_parameters(depth, 100, (64, 128, 256), 32, projection=False)
        assert count(build_model(f"resnet{depth}x4", 100, "identity")) == expected


def feature_shapes(stem, widths):
    shapes = {"stem": (stem, 32, 32), "pre_pool": (widths[2], 8, 8), "pool": (widths[2],)}
    for i, (width, size) in enumerate(zip(widths, (32, 16, 8)), start=1):
        shapes[f"stage{i}"] = shapes[f"stage{i}_pre"] = (width, size, size)
    return shapes


@pytest.mark.parametrize("name,shapes", [
    ("resnet8x4", feature_shapes(32, (64, 128, 256))), ("resnet32x4", feature_shapes(32, (64, 128, 256))),
    ("wrn_16_2", feature_shapes(16, (32, 64, 128))), ("wrn_40_2", feature_shapes(16, (32, 64, 128)))])
def test_crd_benchmark_features(name, shapes):
    torch.manual_seed(0)
    model = build_model(name, 100)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    logits2, feats = model(x, features=True)
    assert logits.shape == (2, 100) and torch.equal(logits, logits2)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == shapes
    assert model.feature_channels == {k: v[0] for k, v in shapes.items()}
    for i in (1, 2, 3):
        assert torch.equal(feats[f"stage{i}"], torch.relu(feats[f"stage{i}_pre"]))
        assert (feats[f"stage{i}_pre"] < 0).any()
    assert (feats["stem"] >= 0).all()
    assert torch.allclose(feats["pool"], feats["stage3"].mean((2, 3)))
    assert torch.allclose(model.fc(feats["pool"]), logits)


def record_outputs(modules):
    """Forward hooks that keep each module's last input and output; returns (store, handles)."""
    store, handles = {}, []
    for key, module in modules.items():
        handles.append(module.register_forward_hook(
            lambda m, inputs, output, key=key: store.__setitem__(key, (inputs[0], output))))
    return store, handles


@pytest.mark.parametrize("name", ["wrn_16_2", "resnet8x4", "resnet20"])
def test_pre_relu_batchnorms_give_the_pre_relu_features(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    bns = model.pre_relu_batchnorms()
    assert list(bns) == ["stage1_pre", "stage2_pre", "stage3_pre"]
    assert all(isinstance(bn, nn.BatchNorm2d) and bn.num_features == model.feature_channels[k]
               for k, bn in bns.items())
    last_blocks = {k: model.stages[i][-1] for i, k in enumerate(bns)}
    bn_io, bn_handles = record_outputs(bns)
    block_io, block_handles = record_outputs(last_blocks)
    _, feats = model(torch.randn(2, 3, 32, 32), features=True)
    for handle in bn_handles + block_handles:
        handle.remove()
    for k, bn in bns.items():
        if name.startswith("wrn"):  # the BN's output is the feature itself
            assert torch.equal(bn_io[k][1], feats[k])
            assert torch.equal(bn_io[k][0], block_io[k][1])  # applied to the stage's residual sum
        else:  # the last block's bn2 output plus its shortcut is the feature
            block = last_blocks[k]
            assert bn is block.bn2
            assert torch.allclose(bn_io[k][1] + block.shortcut(block_io[k][0]), feats[k], atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_model_gives_the_same_outputs_and_features(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in model.modules():  # BN affine parameters away from their 1 / 0 initialisation
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        model.train()(x)  # moves the running statistics away from their initial values
        model.eval()
        logits, feats = model(x, features=True)
        unfoldable = set()  # a ResNet's BNs all follow a conv; a WRN's pre-activation BNs precede one
        if name.startswith("wrn"):
            unfoldable = {id(bn) for bn in model.pre_relu_batchnorms().values()}
            unfoldable |= {id(block.bn1) for stage in model.stages for block in stage[1:]}
            if model.stages[0][0].adds_raw:  # widen factor 1: the stem's output is also the first shortcut
                unfoldable.add(id(model.bn1))
        fold_batchnorm(model)
        left = {id(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
        logits2, feats2 = model(x, features=True)
    assert left == unfoldable
    for k, a, b in [("logits", logits, logits2), *((k, feats[k], feats2[k]) for k in feats)]:
        # equal to float32 rounding, relative to the tensor's scale (deep nets reach values ~ 50)
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item()), k


def test_pre_relu_batchnorms_of_a_folded_resnet_are_refused():
    model = fold_batchnorm(build_model("resnet8", 10).eval())
    with pytest.raises(RuntimeError, match="folded"):
        model.pre_relu_batchnorms()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_know_their_arch_classes_and_shortcut(name):
    model = build_model(name, 100)
    assert (model.arch, model.num_classes, model.shortcut) == (name, 100, "projection")
    assert model.fc.out_features == 100
    if name.startswith("resnet"):
        assert build_model(name, 10, "identity").shortcut == "identity"


@pytest.mark.parametrize("name", ["wrn_16_2", "wrn_40_2"])
def test_wrn_refuses_the_identity_shortcut(name):
    with pytest.raises(ValueError, match=f"^{name} has only the projection shortcut$"):
        build_model(name, 10, "identity")


def test_unknown_shortcut_is_refused():
    with pytest.raises(ValueError, match="unknown shortcut"):
        build_model("resnet8", 10, "zeros")


def test_wrn_initialisation():
    torch.manual_seed(0)
    model = build_model("wrn_40_2", 100)
    conv = model.stages[2][1].conv2  # 128 -> 128, 3x3: kaiming normal, fan_out = 128 * 9
    assert abs(conv.weight.std().item() / (2 / (128 * 9)) ** 0.5 - 1) < 0.02
    assert not model.fc.bias.any()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any()
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


class StandardWRNBlock(nn.Module):
    """A plain pre-activation WRN block as the paper draws it, to check models/wrn.py against."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.project = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out or stride != 1 else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.project is None else self.project(a))


class StandardWRN(nn.Module):
    def __init__(self, depth, k, num_classes):
        super().__init__()
        n, layers, c_in = (depth - 4) // 6, [], 16
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for b in range(n):
                layers.append(StandardWRNBlock(c_in, width, stride if b == 0 else 1))
                c_in = width
        self.blocks, self.bn, self.fc = nn.Sequential(*layers), nn.BatchNorm2d(c_in), nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.blocks(self.conv(x)))).mean((2, 3)))


def leaf_call_order(model, x):
    """The conv / BN / linear layers in the order a forward pass calls them."""
    order, handles = [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            handles.append(m.register_forward_hook(lambda m, i, o: order.append(m)))
    model(x)
    for handle in handles:
        handle.remove()
    return order


def test_wrn_is_a_standard_wrn():
    torch.manual_seed(0)
    ours, standard = build_model("wrn_16_2", 10), StandardWRN(16, 2, 10)
    assert count(ours) == count(standard)
    x = torch.randn(2, 3, 32, 32)
    ours_layers, standard_layers = leaf_call_order(ours, x), leaf_call_order(standard, x)
    leaves = [m for m in standard.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert len(ours_layers) == len(standard_layers) == len(leaves)  # each layer called once
    with torch.no_grad():
        for a, b in zip(ours_layers, standard_layers):  # the same layers, called in the same order
            assert type(a) is type(b)
            assert [t.shape for t in a.state_dict().values()] == [t.shape for t in b.state_dict().values()]
            for t in b.state_dict().values():  # random weights and BN statistics (variances > 0)
                if t.dim() == 1 and t.is_floating_point():
                    t.uniform_(0.5, 1.5)
                elif t.is_floating_point():
                    t.normal_(0, 0.1)
            a.load_state_dict(b.state_dict())
    for mode in (True, False):
        ours.train(mode), standard.train(mode)
        assert torch.allclose(ours(x), standard(x), rtol=1e-5, atol=1e-6)
