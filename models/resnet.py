"""CIFAR ResNets of depth 6n + 2 (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic
blocks with 16, 32 and 64 channels, global average pooling and a linear classifier."""
import torch.nn as nn
import torch.nn.functional as F


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


class CifarResNet(nn.Module):
    """forward(x) gives logits; forward(x, features=True) gives (logits, features) where features
    has 'stem', 'stage1'..'stage3' (after ReLU), 'stage1_pre'..'stage3_pre' (the last block of
    each stage before its ReLU) and 'pool' (the pooled vector fed to the classifier)."""

    def __init__(self, depth, num_classes, shortcut="projection", widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1, shortcut)
                     for b in range(blocks)]
            stages.append(nn.ModuleList(stage))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = {"stem": widths[0], "pool": widths[-1],
                                 **{f"stage{i + 1}": w for i, w in enumerate(widths)},
                                 **{f"stage{i + 1}_pre": w for i, w in enumerate(widths)}}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for i, stage in enumerate(self.stages, start=1):
            for block in stage:
                pre = block(x)
                x = F.relu(pre)
            feats[f"stage{i}_pre"], feats[f"stage{i}"] = pre, x
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc(pooled)
        if not features:
            return logits
        feats["pool"] = pooled
        return logits, feats
