import torch
import torch.nn.functional as F

from .base import STAGES, KDMethod, register, same_size


def finite(x):
    """Non-finite entries zeroed, as the official code does with the SVD's outputs."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def top_singular_vectors(feature, n):
    """The feature map (N x C x H x W) read as N matrices of C*H rows and W columns, as mdistiller
    reshapes it: their first n right singular vectors (N x W x n, unit columns) and singular values
    (N x n, L2-normalised over the n)."""
    # a diverged network's non-finite entries zeroed first: the SVD would raise on them, where the
    # training loop reports a non-finite loss in one sentence (its cross-entropy is non-finite too)
    _, s, vh = torch.linalg.svd(finite(feature).flatten(1, 2), full_matrices=False)
    v = finite(vh.transpose(1, 2)[:, :, :n])
    return F.normalize(v, dim=1), F.normalize(finite(s[:, :n]), dim=1)


def align(v_s, v_t):
    """For each teacher vector, the student vector of the largest |cosine| to it, with the cosine's
    sign (the signs of singular vectors are arbitrary): N x W x k, as many as the teacher's."""
    cosine = v_s.transpose(1, 2) @ v_t
    best = cosine.abs().amax(dim=1, keepdim=True)
    return v_s @ torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))


def rbf(v, v_before):
    """exp(-(a - b)^2 / 8) for every pair of entries of two stages' vectors, per singular vector: N x W x W' x k."""
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / 8)


@register("kdsvd")
class KDSVD(KDMethod):
    """Of each stage output, read as a C*H x W matrix per sample (mdistiller's reshape), the first k
    right singular vectors, scaled by the teacher's singular values (L2-normalised over the k); the
    student's are picked among its first k + 3 and sign-matched to the teacher's (align). Between
    consecutive stages, an RBF of every pair of vector entries; the loss is the squared difference
    of the student's and the teacher's RBFs, summed and divided by the batch size, summed over the
    stage pairs (mdistiller's KDSVD on feats[1:], RepDistiller's on feat[1:-1]: the stage outputs
    after their ReLU).

    The vectors live in the W axis, so the widths may differ but the map sizes must match: where
    they do not, the larger map is average-pooled to the smaller's size first (same_size). The
    gradient flows through the student's SVD, as in the official code; it is undefined (non-finite)
    where a sample's matrix has repeated singular values."""

    paper = "Lee et al. 2018, Self-supervised Knowledge Distillation Using Singular Value Decomposition"
    summary = "squared difference of RBFs between consecutive stages' top singular vectors, student's sign-aligned"
    weight_source = "mdistiller"
    deviations = ("the larger stage map average-pooled to the smaller's size where they differ (mdistiller needs "
                  "equal sizes); mdistiller's C*H x W matrices (RepDistiller's H*W x C need equal widths)")
    features = STAGES
    default_weight = 1.0
    hyperparameters = {"kdsvd_k": (1, "singular vectors per stage (the student's are picked among k + 3)")}

    def __init__(self, student_shapes, teacher_shapes, kdsvd_k):
        super().__init__(student_shapes, teacher_shapes)
        # a W-wide map has W right singular vectors, and every stage must give the teacher k of them
        widths = [min(student_shapes[name][-1], teacher_shapes[name][-1]) for name in self.stages]
        if kdsvd_k > min(widths):
            raise ValueError(f"--kdsvd-k {kdsvd_k} is more than the {min(widths)} singular vectors of the narrowest "
                             f"stage map, {min(widths)} pixels wide")
        self.k = kdsvd_k

    def forward(self, student, teacher, targets):
        losses, before = [], None
        for name in self.stages:
            s, t = same_size(student[name].float(), teacher[name].float())
            v_t, s_t = top_singular_vectors(t, self.k)
            v_s, _ = top_singular_vectors(s, self.k + 3)
            v_s, v_t = align(v_s, v_t) * s_t.unsqueeze(1), v_t * s_t.unsqueeze(1)
            if before is not None:
                losses.append((rbf(v_s, before[0]) - rbf(v_t, before[1])).pow(2).sum())
            before = v_s, v_t
        return sum(losses) / student[self.stages[0]].shape[0]
