"""MobileNetV2 for CIFAR as in the CRD benchmark (RepDistiller's mobile_half: expansion 6, width
multiplier 0.5): a stride-2 3x3 stem, seven groups of inverted residual blocks, a 1x1 convolution to
1,280 channels, global average pooling and one linear classifier. Activations are ReLU (not ReLU6).

Features, at RepDistiller's points: 'stem' (after the stem's ReLU, 16x16), 'stage1' after group 1
(16x16), 'stage2' after group 2 (8x8), 'stage3' after group 4 (4x4), 'stage4' after group 6 (2x2),
and 'pool' (1,280). A group ends on a linear bottleneck, with no ReLU after it, so 'stagek_pre' is
the same tensor as 'stagek'.
"""
import torch.nn as nn

from .resnet import classify, init_like_repdistiller

# (expansion, output channels at width 1, blocks, first block's stride) per group
GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))
FEATURE_GROUPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}  # group index -> feature name


def conv_bn(in_channels, out_channels, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (with the stride), 1x1 linear projection, each with BN; the input
    is added when the shape allows."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(*conv_bn(in_channels, hidden, 1), *conv_bn(hidden, hidden, 3, stride, hidden),
                                  *conv_bn(hidden, out_channels, 1, relu=False))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """forward(x) gives logits; forward(x, features=True) gives (logits, features) with 'stem',
    'stage1'..'stage4', 'stage1_pre'..'stage4_pre' (the same tensors) and 'pool'."""

    def __init__(self, num_classes, shortcut="projection", width=0.5):
        super().__init__()
        if shortcut != "projection":
            raise ValueError("MobileNetV2 has only its own shortcuts")
        self.num_classes, self.shortcut = num_classes, shortcut
        in_channels = int(32 * width)
        self.stem = nn.Sequential(*conv_bn(3, in_channels, 3, stride=2))
        groups, widths = [], {"stem": in_channels}
        for i, (t, channels, blocks, stride) in enumerate(GROUPS):
            out_channels = int(channels * width)
            groups.append(nn.Sequential(*[
                InvertedResidual(in_channels if b == 0 else out_channels, out_channels, stride if b == 0 else 1, t)
                for b in range(blocks)]))
            in_channels = out_channels
            if i in FEATURE_GROUPS:
                widths[FEATURE_GROUPS[i]] = widths[FEATURE_GROUPS[i] + "_pre"] = out_channels
        self.groups = nn.ModuleList(groups)
        last_channels = 1280  # RepDistiller keeps 1,280 for every width multiplier up to 1
        self.head = nn.Sequential(*conv_bn(in_channels, last_channels, 1))
        self.fc = nn.Linear(last_channels, num_classes)
        self.feature_channels = {**widths, "pre_pool": last_channels, "pool": last_channels}
        init_like_repdistiller(self)

    def pre_relu_batchnorms(self):
        """{'stagek_pre': the last BN of the feature's group} (RepDistiller's choice; where that
        group's last block adds its input, the feature is the BN's output plus that input)."""
        bns = {name: self.groups[i][-1].conv[-1] for i, name in FEATURE_GROUPS.items()}
        if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns.values()):
            raise RuntimeError("the batch norms were folded into the convolutions (fold_batchnorm)")
        return {f"{name}_pre": bn for name, bn in bns.items()}

    def forward(self, x, features=False):
        x = self.stem(x)
        feats = {"stem": x}
        for i, group in enumerate(self.groups):
            x = group(x)
            if i in FEATURE_GROUPS:
                feats[FEATURE_GROUPS[i]] = feats[FEATURE_GROUPS[i] + "_pre"] = x
        return classify(self.fc, self.head(x), feats, features)
