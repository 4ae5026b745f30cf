import math

import torch
import torch.nn as nn

from .base import PRE_RELU_STAGES, KDMethod, connector, register


def negative_response_margin(bn):
    """Per channel, the mean of the negative responses E[x | x < 0] of x ~ N(beta, gamma^2), the
    output distribution of the BN (weight gamma, bias beta): beta - |gamma| pdf(z) / cdf(-z) with
    z = beta / |gamma|; where cdf(-z) <= 0.001 (almost no negative responses), -3 |gamma| instead,
    as in the official code."""
    std = bn.weight.detach().double().abs().clamp(min=1e-12)  # a zero gamma is taken as a tiny one
    mean = bn.bias.detach().double()
    z = mean / std
    negative_mass = 0.5 * torch.erfc(z / math.sqrt(2))
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    truncated_mean = mean - std * density / negative_mass.clamp(min=1e-300)
    return torch.where(negative_mass > 1e-3, truncated_mean, -3 * std).float()


@register("ofd")
class OverhaulFeatureDistillation(KDMethod):
    """Partial L2 between the student's pre-ReLU stage outputs, through a 1x1 conv + BN connector
    (always, as in the paper; across spatial sizes the connector rule's conv + BN), and the
    teacher's, each raised to at least a per-channel margin:
    target = max(t, margin), squared difference counted only where s > target or target > 0 (a
    student already below a negative target is not pushed), mean over all elements, averaged over
    the stages. The margin is the expected negative response of the teacher channel, computed
    from the BN that produces it (negative_response_margin) when attach() reads the teacher; until
    then it is 0."""

    paper = "Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation"
    summary = ("partial L2 between the student's pre-ReLU outputs through a 1x1 conv + BN connector and the "
               "teacher's, raised to a per-channel margin from the teacher's BN statistics, averaged over the stages")
    weight_source = "seed zoo"
    deviations = ("margin from the teacher's BN as in the paper (the seed zoo uses each batch's mean negative "
                  "response); element mean as the seed zoo (the official sum / batch / 1000 with stage weights "
                  "corresponds to a weight of about 12 here); across spatial sizes, which the paper's pairs "
                  "never have, the connector rule's strided or transposed conv instead of the 1x1")
    features = PRE_RELU_STAGES
    default_weight = 0.5

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleDict()
        for name in self.stages:
            c_s, c_t = student_shapes[name][0], teacher_shapes[name][0]
            if student_shapes[name][1:] == teacher_shapes[name][1:]:
                self.connectors[name] = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
            else:  # a cross-family pair: the connector rule's layer across sizes, then BN
                self.connectors[name] = connector(student_shapes[name], teacher_shapes[name])
            nn.init.kaiming_normal_(self.connectors[name][0].weight, mode="fan_out", nonlinearity="relu")
            # a buffer, so that the checkpoint keeps the margins of the teacher they came from
            self.register_buffer(f"margin_{name}", torch.zeros(c_t))

    def attach(self, student, teacher, train_labels):
        if not hasattr(teacher.network, "pre_relu_batchnorms"):
            raise ValueError(f"OFD reads the BN before each stage's last ReLU in the teacher, and a "
                             f"{teacher.arch} has none there")
        batchnorms = teacher.network.pre_relu_batchnorms()
        for name in self.stages:
            getattr(self, f"margin_{name}").copy_(negative_response_margin(batchnorms[name]))

    def forward(self, student, teacher, targets):
        losses = []
        for name in self.stages:
            s = self.connectors[name](student[name]).float()
            target = torch.max(teacher[name].float(), getattr(self, f"margin_{name}").view(1, -1, 1, 1))
            counted = (s > target) | (target > 0)
            losses.append(((s - target).pow(2) * counted).mean())
        return sum(losses) / len(losses)
