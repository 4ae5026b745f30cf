import torch.nn.functional as F

from .base import KDMethod, connector, register


@register("fitnet")
class FitNet(KDMethod):
    """Mean squared difference of the last stage outputs, one stage, no hint-training stage.

    Where the widths differ, a 1x1 conv + BN connector maps the student's channels to the teacher's
    (the connector rule, kd_losses/base.py)."""

    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    summary = "MSE of the last stage output, connector where widths differ"
    weight_source = "seed zoo"
    deviations = "one stage, no hint-training stage (seed zoo)"
    features = ("stage3",)
    default_weight = 0.1

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__(student_shapes, teacher_shapes)
        self.connector = connector(student_shapes["stage3"], teacher_shapes["stage3"])

    def forward(self, student, teacher, targets):
        return F.mse_loss(self.connector(student["stage3"]).float(), teacher["stage3"].float())
