"""Model registry: MODELS maps a name to a constructor taking (num_classes, shortcut)."""
from functools import partial

from .resnet import CifarResNet

MODELS = {f"resnet{depth}": partial(CifarResNet, depth)
          for depth in (8, 14, 20, 32, 44, 56, 110)}
SHORTCUTS = ("projection", "identity")


def build_model(name, num_classes, shortcut="projection"):
    return MODELS[name](num_classes=num_classes, shortcut=shortcut)
