"""CIFAR ResNets of depth 6n + 2 (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic
blocks with 16, 32 and 64 channels, global average pooling and a linear classifier. The CRD benchmark's
resnet8x4 / resnet32x4 (RepDistiller) are the same nets with a 32-channel stem and 64/128/256 channels,
and its ResNet50 the same frame with a 64-channel stem and four stages of 3/4/6/3 bottleneck blocks
(256/512/1024/2048 channels, no max-pool)."""
import math

import torch.nn as nn
import torch.nn.functional as F


def init_conv_bn(model):
    """Kaiming-normal (fan_out) convolutions and BN with weight 1 and bias 0, shared by the CIFAR nets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_like_repdistiller(model):
    """RepDistiller's VGG and MobileNetV2 initialisation: convolutions N(0, sqrt(2 / (k * k * out))) with
    a zero bias, BN weight 1 and bias 0, the classifier N(0, 0.01) with a zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.fc.weight, 0, 0.01)
    nn.init.zeros_(model.fc.bias)


def run_stages(stages, x, feats):
    """Runs the stages (each a list of blocks returning their output before its last ReLU), records
    each stage's output before and after that ReLU in feats as 'stageK_pre' and 'stageK', and returns
    the last stage's output."""
    for i, stage in enumerate(stages, start=1):
        for block in stage:
            pre = block(x)
            x = F.relu(pre)
        feats[f"stage{i}_pre"], feats[f"stage{i}"] = pre, x
    return x


def classify(fc, x, feats, features):
    """The head shared by the CIFAR nets: global average pooling and the linear classifier. Returns
    the logits, or (logits, feats) with the map that is pooled added as 'pre_pool' (the last stage
    output, or a head's output after it) and the pooled vector as 'pool' when features is True."""
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    logits = fc(pooled)
    if not features:
        return logits
    feats["pre_pool"], feats["pool"] = x, pooled
    return logits, feats


class ZeroPadShortcut(nn.Module):
    """The paper's option A: subsample spatially and append zero channels; no parameters."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut; returns the sum before the final ReLU so that the
    network can expose pre-ReLU features (the ReLU is applied by the caller)."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # each conv feeds its BN directly: foldable

    def __init__(self, in_channels, out_channels, stride, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "projection":
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)


class Bottleneck(nn.Module):
    """1x1 conv to a quarter of the output width, 3x3 conv (with the stride), 1x1 conv to the output
    width, each with BN, plus a shortcut (a 1x1 conv + BN where the shape changes); returns the sum
    before the final ReLU, as BasicBlock."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_channels, out_channels, stride, shortcut):
        super().__init__()
        if shortcut != "projection":
            raise ValueError("bottleneck blocks have only the projection shortcut")
        middle = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, middle, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.conv2 = nn.Conv2d(middle, middle, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(middle, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)


class CifarResNet(nn.Module):
    """forward(x) gives logits; forward(x, features=True) gives (logits, features) where features
    has 'stem', 'stage1'..'stageK' (after ReLU, one per width), 'stage1_pre'..'stageK_pre' (the
    last block of each stage before its ReLU) and 'pool' (the pooled vector fed to the classifier).
    The stem has stem_width channels (default widths[0]); a first block that changes the width or the
    resolution gets the `shortcut` kind. Basic blocks: n = (depth - 2) / 6 per stage; other blocks
    give their count per stage in stage_blocks."""

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, depth, num_classes, shortcut="projection", widths=(16, 32, 64), stem_width=None,
                 block=BasicBlock, stage_blocks=None):
        super().__init__()
        if stage_blocks is None:
            if (depth - 2) % 6 != 0 or depth < 8:
                raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
            stage_blocks = [(depth - 2) // 6] * len(widths)
        stem_width = stem_width or widths[0]
        self.num_classes, self.shortcut = num_classes, shortcut
        self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        stages, in_channels = [], stem_width
        for i, (width, blocks) in enumerate(zip(widths, stage_blocks)):
            stride = 1 if i == 0 else 2
            stage = [block(in_channels if b == 0 else width, width, stride if b == 0 else 1, shortcut)
                     for b in range(blocks)]
            stages.append(nn.ModuleList(stage))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = {"stem": stem_width, "pre_pool": widths[-1], "pool": widths[-1],
                                 **{f"stage{i + 1}": w for i, w in enumerate(widths)},
                                 **{f"stage{i + 1}_pre": w for i, w in enumerate(widths)}}
        init_conv_bn(self)

    def pre_relu_batchnorms(self):
        """{'stagek_pre': the BN whose output, plus the shortcut, is that feature}: each stage's last
        block's last BN."""
        last = "bn3" if isinstance(self.stages[0][0], Bottleneck) else "bn2"
        bns = {f"stage{i}_pre": getattr(stage[-1], last) for i, stage in enumerate(self.stages, start=1)}
        if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns.values()):
            raise RuntimeError("the batch norms were folded into the convolutions (fold_batchnorm)")
        return bns

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        x = run_stages(self.stages, x, feats)
        return classify(self.fc, x, feats, features)
