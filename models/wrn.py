"""Wide ResNets (Zagoruyko & Komodakis 2016) of depth 6n + 4 and widen factor k, as in the CRD
benchmark (RepDistiller's wrn_16_2 / wrn_40_2): a 3x3 stem with 16 channels, three stages of n
pre-activation basic blocks with 16k, 32k and 64k channels (strides 1, 2, 2), a final BN-ReLU,
global average pooling and a linear classifier; no dropout.

The network is a standard WRN, parameter for parameter and output for output, arranged so that the
BN-ReLU at each stage boundary (the first BN of a stage's first block, or the final BN) sits outside
the blocks: a stage's raw output then goes through that BN once, and its output and ReLU are the
stage's pre-ReLU and post-ReLU features. A standard WRN feeds this activated input to both the conv
and the shortcut of a block that changes shape, which every first block does when k >= 2. With k = 1
(wrn_16_1, wrn_40_1) the first block of stage 1 keeps the shape, and its shortcut adds the stem
convolution's output as it is, before that BN-ReLU."""
import torch.nn as nn
import torch.nn.functional as F

from .resnet import classify, init_conv_bn


class PreActBlock(nn.Module):
    """[BN-ReLU]-conv3x3-BN-ReLU-conv3x3 plus a shortcut. A stage's first block has no BN of its own:
    it takes the already activated input, and its shortcut is a 1x1 convolution (no BN), or where the
    shape does not change, the identity on `raw`, that input before its BN-ReLU. The other blocks
    pre-activate their input themselves and add it unchanged."""

    conv_bn_pairs = (("conv1", "bn2"),)  # bn1 comes before its conv: it cannot be folded

    def __init__(self, in_channels, out_channels, stride, first):
        super().__init__()
        self.bn1 = None if first else nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if changes_shape else nn.Identity()
        self.adds_raw = first and not changes_shape

    def forward(self, x, raw=None):
        out = x if self.bn1 is None else F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + self.shortcut(raw if self.adds_raw else x)


class WideResNet(nn.Module):
    """forward(x) gives logits; forward(x, features=True) gives (logits, features) with the keys of
    CifarResNet: 'stem' = ReLU(BN(stem conv)); 'stagek_pre' = stage k's output (the residual sum)
    through the BN applied next (stage k+1's first, or the final BN) and 'stagek' its ReLU; 'pool'."""

    conv_bn_pairs = (("conv1", "bn1"),)  # the stem conv feeds the stem's BN directly

    def __init__(self, depth, widen_factor, num_classes, shortcut="projection"):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if shortcut != "projection":
            raise ValueError(f"wrn_{depth}_{widen_factor} has only the projection shortcut")
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.shortcut = num_classes, shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.ModuleList(
                [PreActBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1, first=b == 0)
                 for b in range(blocks)]))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        # stage k's output BN: the pre-activation of stage k+1's first block, or the final BN
        self.stage_bns = nn.ModuleList(nn.BatchNorm2d(width) for width in widths)
        self.fc = nn.Linear(widths[-1], num_classes)
        if self.stages[0][0].adds_raw:
            self.conv_bn_pairs = ()  # the stem conv's output is also a shortcut: its BN cannot be folded in
        self.feature_channels = {"stem": 16, "pre_pool": widths[-1], "pool": widths[-1],
                                 **{f"stage{i + 1}": w for i, w in enumerate(widths)},
                                 **{f"stage{i + 1}_pre": w for i, w in enumerate(widths)}}
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)  # as RepDistiller's WRN

    def pre_relu_batchnorms(self):
        """{'stagek_pre': the BN whose output is exactly that feature}."""
        return {f"stage{i}_pre": bn for i, bn in enumerate(self.stage_bns, start=1)}

    def forward(self, x, features=False):
        raw = self.conv1(x)
        x = F.relu(self.bn1(raw))
        feats = {"stem": x}
        for i, (stage, bn) in enumerate(zip(self.stages, self.stage_bns), start=1):
            for block in stage:
                x = block(x, raw)
            pre = bn(x)
            x = F.relu(pre)
            feats[f"stage{i}_pre"], feats[f"stage{i}"] = pre, x
        return classify(self.fc, x, feats, features)
