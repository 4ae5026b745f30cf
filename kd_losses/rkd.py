import torch
import torch.nn.functional as F

from .base import KDMethod, register


def normalized_distances(x):
    """Pairwise Euclidean distances divided by the mean of the off-diagonal ones."""
    n = len(x)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(2)
    # clamp keeps sqrt's gradient finite; the diagonal (zero distance) is then masked to exactly 0,
    # so the off-diagonal mean is the plain sum over n (n - 1) (no boolean indexing: no host sync)
    d = squared.clamp(min=1e-12).sqrt() * off_diagonal
    return d / (d.sum() / (n * (n - 1)))


def angles(x):
    """cos of the angle at x_i between x_j and x_k, for every triple (i, j, k); N x N x N."""
    directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # [i, j] = unit(x_j - x_i)
    return directions.bmm(directions.transpose(1, 2))


@register("rkd")
class RelationalKD(KDMethod):
    """Distance and angle relations between the pooled vectors of a batch, compared with smooth-L1."""

    paper = "Park et al. 2019, Relational Knowledge Distillation"
    summary = "smooth-L1 of normalised pairwise distances (x25) and triplet angles (x50)"
    weight_source = "seed zoo"
    features = ("pool",)
    hyperparameters = {"w_dist": (25.0, "weight of the distance term"),
                       "w_angle": (50.0, "weight of the angle term")}

    def __init__(self, student_shapes, teacher_shapes, w_dist, w_angle):
        super().__init__(student_shapes, teacher_shapes)
        self.w_dist, self.w_angle = w_dist, w_angle

    def forward(self, student, teacher, targets):
        s, t = student["pool"].float(), teacher["pool"].float()
        return {"dist": self.w_dist * F.smooth_l1_loss(normalized_distances(s), normalized_distances(t)),
                "angle": self.w_angle * F.smooth_l1_loss(angles(s), angles(t))}
