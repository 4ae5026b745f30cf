import torch

from .base import KDMethod, register

# the seed zoo's epsilon, both in the normalisation and inside the log (RepDistiller: 1e-7)
EPS = 1e-6


def conditional_probabilities(x):
    """Row i: the cosine similarities of x_i to every x_j of the batch (itself included), mapped to
    [0, 1] as (cos + 1) / 2 and divided by their sum."""
    x = x / (x.norm(dim=1, keepdim=True) + EPS)
    similarity = (x @ x.t() + 1) / 2
    return similarity / similarity.sum(dim=1, keepdim=True)


@register("pkt")
class ProbabilisticKT(KDMethod):
    """KL(teacher || student) between the two batches' conditional probabilities of the pooled
    vectors, as the seed zoo computes it: p_t * log((p_t + eps) / (p_s + eps)) averaged over all
    N x N entries, with eps = 1e-6 and each vector divided by (its L2 norm + eps)."""

    paper = "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer"
    summary = "KL(teacher ‖ student) of the batch's cosine-similarity distributions (`(cos+1)/2`, rows normalised)"
    weight_source = "seed zoo; RepDistiller and mdistiller use 30000 on CIFAR-100"
    deviations = "as the reference code: self-pairs included, mean over N² entries, eps 1e-6 (RepDistiller: 1e-7)"
    # its batch's similarity matrix is averaged over N x N entries: on 8 images its gradient is 96x its
    # norm on 128 (SP's 19x, every other method's 0.5 to 4.7x: benchmarks/small_batch.py)
    small_batch_steps = True
    features = ("pool",)
    default_weight = 10000.0

    def forward(self, student, teacher, targets):
        s, t = student["pool"].float(), teacher["pool"].float()
        p_s, p_t = conditional_probabilities(s), conditional_probabilities(t)
        return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
