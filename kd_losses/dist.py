import torch.nn.functional as F

from .base import KDMethod, register

# added to the product of the norms, as the official code does, so that a constant row (a batch of
# one, in the intra-class term) gives a correlation of 0 rather than 0 / 0
EPS = 1e-8


def mean_pearson(a, b):
    """Pearson correlation of each row of `a` with the same row of `b`, averaged over the rows."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)).mean()


@register("dist")
class DIST(KDMethod):
    """T^2 * (beta * inter + gamma * intra) on p = softmax(logits / T) of student and teacher.
    inter: 1 - the Pearson correlation of the two probability vectors of a sample, averaged over
    the batch. intra: the same per class, over the batch (the columns of the N x C matrices).
    Returned as named terms 'inter' and 'intra'."""

    paper = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher"
    summary = "`T^2 (beta (1 - mean row corr.) + gamma (1 - mean column corr.))` of the N x C probabilities at T"
    weight_source = "official CIFAR-100 config (hunto/image_classification_sota `dist_cifar.yaml`: KD 2, CE 1)"
    default_weight = 2.0
    hyperparameters = {
        "T": (4.0, "softmax temperature"),
        "dist_beta": (1.0, "weight of the inter-class (per-sample) correlation term"),
        "dist_gamma": (1.0, "weight of the intra-class (per-class) correlation term"),
    }

    def __init__(self, student_shapes, teacher_shapes, T, dist_beta, dist_gamma):
        super().__init__(student_shapes, teacher_shapes)
        self.T, self.beta, self.gamma = T, dist_beta, dist_gamma

    def forward(self, student, teacher, targets):
        p_s = F.softmax(student["logits"].float() / self.T, dim=1)
        p_t = F.softmax(teacher["logits"].float() / self.T, dim=1)
        scale = self.T ** 2
        return {"inter": scale * self.beta * (1 - mean_pearson(p_s, p_t)),
                "intra": scale * self.gamma * (1 - mean_pearson(p_s.t(), p_t.t()))}
