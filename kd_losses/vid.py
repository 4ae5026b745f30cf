import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import STAGES, KDMethod, register, same_size

EPS = 1e-6  # variance floor; the seed zoo's value (RepDistiller uses 1e-5)


def regressor(in_channels, hidden_channels, out_channels):
    """1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no bias and no BN (the seed zoo's choice)."""
    layers = nn.Sequential(nn.Conv2d(in_channels, hidden_channels, 1, bias=False), nn.ReLU(),
                           nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False), nn.ReLU(),
                           nn.Conv2d(hidden_channels, out_channels, 1, bias=False))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return layers


@register("vid")
class VariationalInformation(KDMethod):
    """Negative log-likelihood of the teacher's stage output under a Gaussian whose mean a regressor
    predicts from the student's, with a learned per-channel variance var_c = softplus(alpha_c) + 1e-6
    (alpha starts where var_c = vid_init_var): the mean over all elements of
    0.5 * (log var_c + (mu - t)^2 / var_c), for each stage output (post-ReLU), averaged; where the
    two maps differ in size, the larger is average-pooled to the smaller first (RepDistiller).
    The constant 0.5 log(2 pi) is left out, so the loss is not zero even when mu = t."""

    paper = "Ahn et al. 2019, Variational Information Distillation for Knowledge Transfer"
    summary = ("Gaussian negative log-likelihood of the teacher's stage output under a regressor's mean and a "
               "learned per-channel variance `softplus(a_c) + eps`, averaged over the stages")
    weight_source = "seed zoo"
    deviations = ("hidden width = teacher width, no BN in the regressor (seed zoo); element mean; eps 1e-6 "
                  "(RepDistiller 1e-5)")
    features = STAGES
    default_weight = 1.0
    hyperparameters = {"vid_scale": (1.0, "hidden channels of the regressor = scale x teacher channels"),
                       "vid_init_var": (5.0, "initial variance of the Gaussian")}

    def __init__(self, student_shapes, teacher_shapes, vid_scale, vid_init_var):
        super().__init__(student_shapes, teacher_shapes)
        if vid_init_var <= EPS:
            raise ValueError(f"the initial variance must exceed {EPS}, got {vid_init_var}")
        self.regressors = nn.ModuleDict()
        self.alphas = nn.ParameterDict()
        for name in self.stages:
            c_s, c_t = student_shapes[name][0], teacher_shapes[name][0]
            self.regressors[name] = regressor(c_s, max(1, int(vid_scale * c_t)), c_t)
            # softplus^-1(init_var - eps), so that softplus(alpha) + eps = init_var exactly
            self.alphas[name] = nn.Parameter(torch.full((c_t,), math.log(math.expm1(vid_init_var - EPS))))

    def forward(self, student, teacher, targets):
        losses = []
        for name in self.stages:
            s, target = same_size(student[name], teacher[name].float())  # pooled before the regressor
            mean = self.regressors[name](s).float()
            var = (F.softplus(self.alphas[name].float()) + EPS).view(1, -1, 1, 1)
            losses.append((0.5 * (var.log() + (mean - target).pow(2) / var)).mean())
        return sum(losses) / len(losses)
