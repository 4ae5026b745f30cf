"""What every KD method shares: the registry and the base class.

A method is an nn.Module built from the student's and the teacher's feature shapes and its own
hyper-parameters. forward(student, teacher, targets) gets two dicts holding 'logits' and the
features named in `features` (see models/resnet.py for the names) and returns the KD loss as a
tensor, or a dict of named terms that are summed. Learnable parts are submodules.
"""
import torch.nn as nn

METHODS = {}


def register(name):
    def add(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return add


class KDMethod(nn.Module):
    paper = ""                 # short citation, shown in --help and the README
    features = ()              # feature names read besides 'logits'
    default_weight = 1.0       # the weight of the KD term unless --kd-weight is given
    hyperparameters = {}       # argument name -> (default, help); each becomes a --flag
    has_stage = False          # True for a method that trains a part alone before the student

    def __init__(self, student_shapes, teacher_shapes, **hparams):
        """student_shapes/teacher_shapes: feature name -> shape of one sample, e.g. (64, 8, 8)."""
        super().__init__()

    def forward(self, student, teacher, targets):
        raise NotImplementedError


def conv_bn_lrelu(in_channels, out_channels, transposed=False):
    """3x3 (transposed) convolution, BN and LeakyReLU(0.1): FT's paraphraser and translator layers."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(conv(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU(0.1))
