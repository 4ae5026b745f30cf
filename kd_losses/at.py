import torch.nn.functional as F

from .base import STAGES, KDMethod, register


def attention_map(feature, p):
    """Sum over channels of |f|^p, flattened per sample and divided by its L2 norm."""
    return F.normalize(feature.float().abs().pow(p).sum(1).flatten(1), dim=1)


@register("at")
class AttentionTransfer(KDMethod):
    """Mean squared difference of normalised attention maps of the three stage outputs, averaged.

    As in the seed zoo, the map is the channel sum of |f|^p (the paper's F_sum^p), not a mean."""

    paper = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention"
    summary = "MSE of per-sample L2-normalised attention maps (channel sum of `|f|^p`), averaged over 3 stages"
    weight_source = "seed zoo"
    deviations = "channel *sum* of `|f|^2` (seed zoo)"
    features = STAGES
    default_weight = 1000.0
    hyperparameters = {"p": (2.0, "power applied to |feature| before the channel sum")}

    def __init__(self, student_shapes, teacher_shapes, p):
        super().__init__(student_shapes, teacher_shapes)
        for name in STAGES:
            if student_shapes[name][1:] != teacher_shapes[name][1:]:
                raise ValueError(f"AT needs equal spatial sizes, got {student_shapes[name]} and "
                                 f"{teacher_shapes[name]} at {name}")
        self.p = p

    def forward(self, student, teacher, targets):
        losses = [F.mse_loss(attention_map(student[k], self.p), attention_map(teacher[k], self.p)) for k in STAGES]
        return sum(losses) / len(losses)
