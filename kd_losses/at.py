import torch.nn.functional as F

from .base import STAGES, KDMethod, register, same_size


def attention_map(feature, p):
    """Sum over channels of |f|^p, flattened per sample and divided by its L2 norm."""
    return F.normalize(feature.float().abs().pow(p).sum(1).flatten(1), dim=1)


@register("at")
class AttentionTransfer(KDMethod):
    """Mean squared difference of normalised attention maps of every stage output, averaged; where
    the two maps differ in size, the larger is average-pooled to the smaller first (RepDistiller).

    As in the seed zoo, the map is the channel sum of |f|^p (the paper's F_sum^p), not a mean."""

    paper = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention"
    summary = "MSE of per-sample L2-normalised attention maps (channel sum of `|f|^p`), averaged over the stages"
    weight_source = "seed zoo"
    deviations = "channel *sum* of `|f|^2` (seed zoo)"
    features = STAGES
    default_weight = 1000.0
    hyperparameters = {"p": (2.0, "power applied to |feature| before the channel sum")}

    def __init__(self, student_shapes, teacher_shapes, p):
        super().__init__(student_shapes, teacher_shapes)
        self.p = p

    def forward(self, student, teacher, targets):
        losses = []
        for name in self.stages:
            s, t = same_size(student[name], teacher[name])
            losses.append(F.mse_loss(attention_map(s, self.p), attention_map(t, self.p)))
        return sum(losses) / len(losses)
