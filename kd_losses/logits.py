import torch.nn.functional as F

from .base import KDMethod, register


@register("logits")
class Logits(KDMethod):
    """Mean squared difference of the logits, averaged over the batch and the classes."""

    paper = "Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?"
    summary = "MSE of the logits"
    weight_source = "seed zoo"
    deviations = "mean over classes, not the paper's halved sum; CE kept (the paper regresses logits alone)"
    default_weight = 0.1

    def forward(self, student, teacher, targets):
        return F.mse_loss(student["logits"].float(), teacher["logits"].float())
