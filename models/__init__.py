"""Model registry: MODELS maps a name to a constructor taking (num_classes, shortcut)."""
from functools import partial

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .resnet import CifarResNet

MODELS = {f"resnet{depth}": partial(CifarResNet, depth)
          for depth in (8, 14, 20, 32, 44, 56, 110)}
SHORTCUTS = ("projection", "identity")


def build_model(name, num_classes, shortcut="projection"):
    return MODELS[name](num_classes=num_classes, shortcut=shortcut)


def fold_batchnorm(model):
    """Folds every BN into the convolution before it (conv1/bn1, conv2/bn2 and Sequential(conv, bn)
    shortcuts), in place: the same outputs and features to rounding, one op fewer per layer. For a
    model in eval mode that will not train again (a teacher)."""
    for parent in list(model.modules()):
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            if isinstance(getattr(parent, bn, None), nn.BatchNorm2d):
                setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
                setattr(parent, bn, nn.Identity())
        if isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[1], nn.BatchNorm2d):
            parent[0], parent[1] = fuse_conv_bn_eval(parent[0], parent[1]), nn.Identity()
    return model
