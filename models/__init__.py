"""Model registry: MODELS maps a name to a constructor taking (num_classes, shortcut)."""
from functools import partial

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils import UserError

from .resnet import CifarResNet
from .wrn import WideResNet

MODELS = {f"resnet{depth}": partial(CifarResNet, depth)
          for depth in (8, 14, 20, 32, 44, 56, 110)}
# the CRD benchmark's pairs (RepDistiller)
MODELS.update({f"resnet{depth}x4": partial(CifarResNet, depth, widths=(64, 128, 256), stem_width=32)
               for depth in (8, 32)})
MODELS.update({f"wrn_{depth}_2": partial(WideResNet, depth, 2) for depth in (16, 40)})
SHORTCUTS = ("projection", "identity")


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
    pairs each module class declares in `conv_bn_pairs`, and Sequential(conv, bn) shortcuts. The same
    outputs and features to rounding, one op fewer per layer. For a model in eval mode that will not
    train again (a teacher)."""
    for parent in list(model.modules()):
        for conv, bn in getattr(type(parent), "conv_bn_pairs", ()):
            if isinstance(getattr(parent, bn), nn.BatchNorm2d):  # not folded already
                setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
                setattr(parent, bn, nn.Identity())
        if (isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[0], nn.Conv2d)
                and isinstance(parent[1], nn.BatchNorm2d)):
            parent[0], parent[1] = fuse_conv_bn_eval(parent[0], parent[1]), nn.Identity()
    return model
