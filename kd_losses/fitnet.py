import torch.nn.functional as F

from .base import LAST_STAGE, KDMethod, connector, register


@register("fitnet")
class FitNet(KDMethod):
    """Mean squared difference of the last stage outputs, one stage, no hint-training stage.

    Where the shapes differ, a connector maps the student's output to the teacher's shape (the
    connector rule, kd_losses/base.py)."""

    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    summary = "MSE of the last stage output, connector where shapes differ"
    weight_source = "seed zoo"
    deviations = "one stage, no hint-training stage (seed zoo)"
    features = (LAST_STAGE,)
    default_weight = 0.1

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__(student_shapes, teacher_shapes)
        self.stage_name = self.stages[0]
        self.connector = connector(student_shapes[self.stage_name], teacher_shapes[self.stage_name])

    def forward(self, student, teacher, targets):
        return F.mse_loss(self.connector(student[self.stage_name]).float(), teacher[self.stage_name].float())
