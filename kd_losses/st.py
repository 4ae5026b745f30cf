import torch.nn.functional as F

from .base import KDMethod, register


@register("st")
class SoftTarget(KDMethod):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the batch."""

    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    summary = "`T^2 KL(p_t^T ‖ p_s^T)`, batch mean"
    weight_source = "seed zoo"
    default_weight = 0.1
    hyperparameters = {"T": (4.0, "softmax temperature")}

    def __init__(self, student_shapes, teacher_shapes, T):
        super().__init__(student_shapes, teacher_shapes)
        self.T = T

    def forward(self, student, teacher, targets):
        log_p_s = F.log_softmax(student["logits"].float() / self.T, dim=1)
        p_t = F.softmax(teacher["logits"].float() / self.T, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="batchmean") * self.T ** 2
