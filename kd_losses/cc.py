import math

import torch.nn.functional as F

from .base import KDMethod, register


def correlation(x, gamma, order):
    """The batch's correlation matrix under the Gaussian RBF kernel exp(-gamma * |a - b|^2) of the
    L2-normalised vectors: for unit vectors that is exp(-2 gamma) * exp(2 gamma * cos), here with
    exp(2 gamma * cos) replaced by its Taylor expansion up to cos^order."""
    x = F.normalize(x, dim=1)
    cos = x @ x.t()
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cos.pow(p)
               for p in range(order + 1))


@register("cc")
class CorrelationCongruence(KDMethod):
    """Mean squared difference of the student's and the teacher's correlation matrices of the
    pooled vectors. As in the seed zoo: no instance congruence term, no special batch sampling."""

    paper = "Peng et al. 2019, Correlation Congruence for Knowledge Distillation"
    summary = ("MSE of batch correlation matrices under a Gaussian RBF kernel (2nd-order Taylor, gamma 0.4) of "
               "L2-normalised vectors")
    weight_source = "seed zoo"
    deviations = ("no instance congruence, no special sampling (seed zoo); RepDistiller's CC is a different, "
                  "embedding-based loss (weight 0.02)")
    features = ("pool",)
    default_weight = 100.0
    hyperparameters = {"cc_gamma": (0.4, "gamma of the Gaussian RBF kernel"),
                       "cc_order": (2, "order P of the kernel's Taylor expansion")}

    def __init__(self, student_shapes, teacher_shapes, cc_gamma, cc_order):
        super().__init__(student_shapes, teacher_shapes)
        self.gamma, self.order = cc_gamma, cc_order

    def forward(self, student, teacher, targets):
        s, t = student["pool"].float(), teacher["pool"].float()
        return F.mse_loss(correlation(s, self.gamma, self.order), correlation(t, self.gamma, self.order))
