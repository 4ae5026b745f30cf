"""ShuffleNet V1 and V2 for CIFAR as in the CRD benchmark (RepDistiller's ShuffleV1: groups 3,
stages of 240/480/960 channels with 4/8/4 blocks; ShuffleV2: net size 1, stages of 116/232/464
channels with 1 + 3/7/3 blocks and a 1x1 convolution to 1,024 channels before pooling). Both start
with a 1x1 convolution to 24 channels at 32x32 and halve the resolution at every stage (16, 8, 4).
PyTorch's default initialisation, as RepDistiller's.

Features: 'stem' (after the stem's ReLU), 'stage1'..'stage3' (each stage's output),
'stage1_pre'..'stage3_pre' (the same before the last block's ReLU) and 'pool'. In ShuffleV2,
'stagek_pre' is channel-shuffled like 'stagek' (RepDistiller returns it before the shuffle: the same
values in another channel order), so that 'stagek' = ReLU('stagek_pre') in both networks.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import classify, run_stages


def shuffle_channels(x, groups):
    """[N, g*c, H, W] -> the channels of each group interleaved."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def check_shortcut(shortcut, name):
    if shortcut != "projection":
        raise ValueError(f"{name} has only its own shortcuts")


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv (with the stride), grouped 1x1 conv,
    each with BN (ReLU after the first two); the input is added, or at stride 2 average-pooled and
    concatenated. Returns the result before its ReLU."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        self.stride = stride
        branch = out_channels - in_channels if stride == 2 else out_channels  # the concatenation adds the rest
        middle = branch // 4
        self.first_groups = 1 if in_channels == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1 = nn.Conv2d(in_channels, middle, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.conv2 = nn.Conv2d(middle, middle, 3, stride, 1, groups=middle, bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(middle, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        out = shuffle_channels(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x


class ShuffleV2Block(nn.Module):
    """Half the channels pass unchanged; the other half go through 1x1 conv-BN-ReLU, 3x3 depthwise
    conv-BN, 1x1 conv-BN; both halves are concatenated and shuffled. Returns the result before the
    last ReLU (the unchanged half is the previous block's non-negative output: ReLU leaves it as is)."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, changed = x.chunk(2, dim=1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(changed)))))))
        return shuffle_channels(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """The stride-2 first block of a V2 stage: two branches (3x3 depthwise then 1x1; 1x1, 3x3
    depthwise, 1x1) each to half the output channels, concatenated and shuffled."""

    conv_bn_pairs = tuple((f"conv{i}", f"bn{i}") for i in range(1, 6))

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return shuffle_channels(torch.cat([left, right], 1), 2)


class ShuffleNet(nn.Module):
    """The two versions' shared frame: stem, three stages of blocks that return pre-ReLU outputs, an
    optional head, pooling, classifier. forward(x, features=True) gives (logits, features) with
    'stem', 'stage1'..'stage3', 'stage1_pre'..'stage3_pre' and 'pool'."""

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, num_classes, stages, widths, head=None):
        super().__init__()
        self.num_classes, self.shortcut = num_classes, "projection"
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.stages = nn.ModuleList(nn.ModuleList(blocks) for blocks in stages)
        self.head = head or nn.Identity()
        pool = head[0].out_channels if head else widths[-1]
        self.fc = nn.Linear(pool, num_classes)
        self.feature_channels = {"stem": 24, "pre_pool": pool, "pool": pool, **{f"stage{i}": w for i, w in enumerate(widths, 1)},
                                 **{f"stage{i}_pre": w for i, w in enumerate(widths, 1)}}

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        x = run_stages(self.stages, x, feats)
        return classify(self.fc, self.head(x), feats, features)


def shufflenet_v1(num_classes, shortcut="projection", widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
    check_shortcut(shortcut, "ShuffleV1")
    stages, in_channels = [], 24
    for width, count in zip(widths, blocks):
        stages.append([ShuffleV1Block(in_channels if b == 0 else width, width, 2 if b == 0 else 1, groups)
                       for b in range(count)])
        in_channels = width
    return ShuffleNet(num_classes, stages, widths)


def shufflenet_v2(num_classes, shortcut="projection", widths=(116, 232, 464), blocks=(3, 7, 3), last=1024):
    check_shortcut(shortcut, "ShuffleV2")
    stages, in_channels = [], 24
    for width, count in zip(widths, blocks):
        stages.append([ShuffleV2Down(in_channels, width)] + [ShuffleV2Block(width) for _ in range(count)])
        in_channels = width
    head = nn.Sequential(nn.Conv2d(in_channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
    return ShuffleNet(num_classes, stages, widths, head)
