import torch.nn as nn
import torch.nn.functional as F

from .base import KDMethod, register


@register("fitnet")
class FitNet(KDMethod):
    """Mean squared difference of the last stage outputs, one stage, no hint-training stage.

    Where the widths differ, a 1x1 conv + BN connector maps the student's channels to the teacher's."""

    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    features = ("stage3",)
    default_weight = 0.1

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__(student_shapes, teacher_shapes)
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shapes["stage3"], teacher_shapes["stage3"]
        if (h_s, w_s) != (h_t, w_t):
            raise ValueError(f"Fitnet needs equal spatial sizes, got {(h_s, w_s)} and {(h_t, w_t)}")
        self.connector = nn.Identity() if c_s == c_t else nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))

    def forward(self, student, teacher, targets):
        return F.mse_loss(self.connector(student["stage3"]).float(), teacher["stage3"].float())
