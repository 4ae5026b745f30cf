import torch
import torch.nn.functional as F

from .base import LAST_STAGE, SECOND_LAST_STAGE, KDMethod, register

# floor of the squared distances, as in the seed zoo: keeps the division by the maximum finite
EPS = 1e-12


def edge_matrix(x):
    """Squared Euclidean distances between the batch's flattened features (N x N), diagonal 0,
    divided by the largest entry."""
    x = x.flatten(1)
    squared_norms = x.pow(2).sum(1)
    # the expanded form needs no N x N x D tensor (D is 8192 for a ResNet's stage2)
    d = (squared_norms.unsqueeze(0) + squared_norms.unsqueeze(1) - 2 * x @ x.t()).clamp(min=EPS)
    d = d * ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d / d.max()


def transform_distances(early, late):
    """Per sample, the squared distance between its features at two stages (N), divided by
    the largest. To compare them, the larger spatial size is average-pooled to the smaller and
    the wider one's channels are averaged in adjacent groups down to the narrower count (adaptive
    average pooling; for twice the channels, the seed zoo's mean of channels 2i, 2i+1)."""
    size = [min(a, b) for a, b in zip(early.shape[2:], late.shape[2:])]
    early, late = F.adaptive_avg_pool2d(early, size), F.adaptive_avg_pool2d(late, size)
    channels = min(early.shape[1], late.shape[1])
    early, late = average_channels(early, channels), average_channels(late, channels)
    d = (early - late).flatten(1).pow(2).sum(1).clamp(min=EPS)
    return d / d.max()


def average_channels(x, channels):
    """N x C x H x W -> N x channels x H x W, each output channel the mean of adjacent inputs."""
    n, c, h, w = x.shape
    if c == channels:
        return x
    pooled = F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2), channels)  # N x HW x channels
    return pooled.transpose(1, 2).reshape(n, channels, h, w)


@register("irg")
class InstanceRelationshipGraph(KDMethod):
    """Three terms, in the seed zoo's one-to-one mode (student layer k against teacher layer k):
    vertex: mean squared difference of the logits (the graph's vertices at the last layer);
    edge: mean squared difference of the edge matrices (max-normalised squared distances between
    the batch's samples) of the last two stages' outputs (stage2 and stage3 in a ResNet) and the
    pooled vector, averaged over the three; transform: mean squared difference of the max-normalised
    per-sample distances between the last two stages' outputs. Every term compares N- or N x N-sized
    quantities or logits, so any widths pair with no connector. Returned as named terms, each times its weight."""

    paper = "Liu et al. 2019, Knowledge Distillation via Instance Relationship Graph"
    summary = ("vertex (MSE of logits, x0.1), edge (MSE of max-normalised squared-distance matrices of the last "
               "two stages and `pool`, x5) and transformation (distances between the last two stages, x5) terms")
    weight_source = "seed zoo"
    deviations = ("one-to-one mode only (seed zoo); the transformation term averages adjacent channels down to "
                  "the narrower stage, which equals the seed zoo's pair mean for these nets and also works for "
                  "other widths")
    features = (SECOND_LAST_STAGE, LAST_STAGE, "pool")
    hyperparameters = {"irg_w_vertex": (0.1, "weight of the vertex (logits) term"),
                       "irg_w_edge": (5.0, "weight of the edge term"),
                       "irg_w_transform": (5.0, "weight of the transformation term between the last two stages")}

    def __init__(self, student_shapes, teacher_shapes, irg_w_vertex, irg_w_edge, irg_w_transform):
        super().__init__(student_shapes, teacher_shapes)
        self.w_vertex, self.w_edge, self.w_transform = irg_w_vertex, irg_w_edge, irg_w_transform

    def forward(self, student, teacher, targets):
        s = {k: v.float() for k, v in student.items()}
        t = {k: v.float() for k, v in teacher.items()}
        edges = [F.mse_loss(edge_matrix(s[k]), edge_matrix(t[k])) for k in self.features]
        early, late = self.stages
        transform = F.mse_loss(transform_distances(s[early], s[late]), transform_distances(t[early], t[late]))
        return {"vertex": self.w_vertex * F.mse_loss(s["logits"], t["logits"]),
                "edge": self.w_edge * sum(edges) / len(edges),
                "transform": self.w_transform * transform}
