"""Model registry: MODELS maps a name to a constructor taking (num_classes, shortcut)."""
from functools import partial

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils import UserError

from .mobilenetv2 import MobileNetV2
from .resnet import Bottleneck, CifarResNet
from .shufflenet import shufflenet_v1, shufflenet_v2
from .vgg import VGG_BLOCKS, VGG
from .wrn import WideResNet

MODELS = {f"resnet{depth}": partial(CifarResNet, depth)
          for depth in (8, 14, 20, 32, 44, 56, 110)}
# the CRD benchmark's networks, named as RepDistiller names them
MODELS.update({f"resnet{depth}x4": partial(CifarResNet, depth, widths=(64, 128, 256), stem_width=32)
               for depth in (8, 32)})
MODELS.update({f"wrn_{depth}_{k}": partial(WideResNet, depth, k) for depth in (16, 40) for k in (1, 2)})
MODELS.update({f"vgg{depth}": partial(VGG, depth) for depth in VGG_BLOCKS})
MODELS["ResNet50"] = partial(CifarResNet, 50, widths=(256, 512, 1024, 2048), stem_width=64, block=Bottleneck,
                             stage_blocks=(3, 4, 6, 3))
MODELS["MobileNetV2"] = MobileNetV2
MODELS["ShuffleV1"] = shufflenet_v1
MODELS["ShuffleV2"] = shufflenet_v2
SHORTCUTS = ("projection", "identity")
# the CRD benchmark's 13 (teacher, student) pairs on CIFAR-100, in the order of RepDistiller's tables:
# 7 within a family, then 6 across families
CRD_BENCHMARK_PAIRS = (
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))


def build_model(name, num_classes, shortcut="projection"):
    """The model `name`, with plain attributes arch, num_classes and shortcut (as checkpoints store
    them). Raises ValueError for a shortcut the architecture does not have."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}, expected one of {', '.join(SHORTCUTS)}")
    model = MODELS[name](num_classes=num_classes, shortcut=shortcut)
    model.arch = name
    return model


def build_network(name, num_classes, shortcut="projection"):
    """build_model, with a combination the architecture lacks (a WRN with --shortcut identity) as a UserError."""
    try:
        return build_model(name, num_classes, shortcut)
    except ValueError as e:
        raise UserError(f"--model {name}: {e}.") from None


def fold_batchnorm(model):
    """Folds every BN that directly follows a convolution into it, in place: the (conv, bn) attribute
    pairs each module class declares in `conv_bn_pairs`, and a BN right after a conv in a Sequential. The same
    outputs and features to rounding, one op fewer per layer. For a model in eval mode that will not
    train again (a teacher)."""
    for parent in list(model.modules()):
        for conv, bn in getattr(parent, "conv_bn_pairs", ()):
            if isinstance(getattr(parent, bn), nn.BatchNorm2d):  # not folded already
                setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
                setattr(parent, bn, nn.Identity())
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], nn.BatchNorm2d):
                    parent[i], parent[i + 1] = fuse_conv_bn_eval(parent[i], parent[i + 1]), nn.Identity()
    return model
