"""VGG with batch norm for CIFAR, as in the CRD benchmark (RepDistiller's vgg8/11/13/16/19_bn): five
blocks of 3x3 convolutions (with bias) each followed by BN and ReLU, a 2x2 max-pool after each of the
first three blocks (none after the fourth at 32x32, so the last two blocks both run at 4x4), global
average pooling and one linear classifier; no hidden FC layers, no dropout.

Features: 'stem' is the first block's output (after ReLU); 'stage1'..'stage4' are the outputs of
blocks 1..4, after their ReLU, and 'stage1_pre'..'stage4_pre' the same before it (the block's last BN).
"""
import torch.nn as nn
import torch.nn.functional as F

from .resnet import classify, init_like_repdistiller

# output channels of each convolution, per block (RepDistiller's configurations S, A, B, D and E)
VGG_BLOCKS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def conv_block(in_channels, widths):
    """conv-BN-ReLU per width, without the last ReLU: the block ends on its BN, so that the network
    can expose the pre-ReLU output."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """forward(x) gives logits; forward(x, features=True) gives (logits, features) with 'stem',
    'stage1'..'stage4', 'stage1_pre'..'stage4_pre' and 'pool'."""

    def __init__(self, depth, num_classes, shortcut="projection"):
        super().__init__()
        if depth not in VGG_BLOCKS:
            raise ValueError(f"no VGG of depth {depth}; there are {', '.join(map(str, VGG_BLOCKS))}")
        if shortcut != "projection":
            raise ValueError(f"vgg{depth} has no shortcuts")
        self.num_classes, self.shortcut = num_classes, shortcut
        blocks, in_channels = [], 3
        for widths in VGG_BLOCKS[depth]:
            blocks.append(conv_block(in_channels, widths))
            in_channels = widths[-1]
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        widths = [block_widths[-1] for block_widths in VGG_BLOCKS[depth]]
        self.feature_channels = {"stem": widths[0], "pre_pool": widths[-1], "pool": widths[-1],
                                 **{f"stage{i}": w for i, w in enumerate(widths[1:], start=1)},
                                 **{f"stage{i}_pre": w for i, w in enumerate(widths[1:], start=1)}}
        init_like_repdistiller(self)

    def pre_relu_batchnorms(self):
        """{'stagek_pre': the BN whose output is exactly that feature}: each block's last layer."""
        bns = {f"stage{i}_pre": block[-1] for i, block in enumerate(self.blocks) if i > 0}
        if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns.values()):
            raise RuntimeError("the batch norms were folded into the convolutions (fold_batchnorm)")
        return bns

    def forward(self, x, features=False):
        x = F.relu(self.blocks[0](x))
        feats = {"stem": x}
        for i, block in enumerate(self.blocks[1:], start=1):
            # 2x2 max-pool before blocks 1-3; block 4 runs at block 3's 4x4 (as RepDistiller at 32x32)
            pre = block(F.max_pool2d(x, 2) if i < 4 else x)
            x = F.relu(pre)
            feats[f"stage{i}_pre"], feats[f"stage{i}"] = pre, x
        return classify(self.fc, x, feats, features)
