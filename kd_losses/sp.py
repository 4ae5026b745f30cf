import torch.nn.functional as F

from .base import STAGES, KDMethod, register


def similarity(feature):
    """The batch's Gram matrix of flattened features (N x N), each row divided by its L2 norm."""
    f = feature.float().flatten(1)
    return F.normalize(f @ f.t(), dim=1)


@register("sp")
class SimilarityPreserving(KDMethod):
    """For each stage output, the mean squared difference of the two row-normalised similarity
    matrices (the squared Frobenius norm of the difference / N^2); the stages are averaged,
    as in the seed zoo (RepDistiller uses only the last stage). Any widths and spatial sizes pair."""

    paper = "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation"
    summary = "MSE of the row-normalised batch Gram matrices, averaged over the stages"
    weight_source = "seed zoo, RepDistiller"
    deviations = "every stage averaged (seed zoo); RepDistiller uses the last only"
    # as PKT's (pkt.py), its N x N similarity matrix makes a small batch's step many times larger
    small_batch_steps = True
    features = STAGES
    default_weight = 3000.0

    def forward(self, student, teacher, targets):
        losses = [F.mse_loss(similarity(student[k]), similarity(teacher[k])) for k in self.stages]
        return sum(losses) / len(losses)
