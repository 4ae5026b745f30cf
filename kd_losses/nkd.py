import torch.nn.functional as F

from .base import KDMethod, register
from .dkd import MASK


@register("nkd")
class NormalizedKD(KDMethod):
    """target + nontarget, both averaged over the batch:
    target: -P_t(y) * log P_s(y), the student's log-probability of the label weighted by the
    teacher's probability of it, both from softmax(logits) at temperature 1.
    nontarget: -nkd_gamma * T^2 * sum over c != y of q_t(c) log q_s(c), where q = softmax(logits / T)
    over the non-target classes alone (each network's non-target probabilities renormalised to sum
    to 1), a cross-entropy as in the official code (the KL minus the teacher's entropy, which has no
    gradient). Returned as named terms 'target' and 'nontarget'."""

    paper = ("Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with "
             "Normalized Loss and Customized Soft Labels")
    summary = ("`-p_t(y) log p_s(y)` + `gamma T^2` CE of the renormalised non-target distributions at T "
               "(`q_t` against `q_s`), batch mean")
    weight_source = "official code (yzd-v/cls_KD: the NKD loss and the CE both with weight 1)"
    default_weight = 1.0
    hyperparameters = {
        "T": (3.0, "softmax temperature"),
        "nkd_gamma": (3.5, "weight of the normalised non-target term"),
    }

    def __init__(self, student_shapes, teacher_shapes, T, nkd_gamma):
        super().__init__(student_shapes, teacher_shapes)
        self.T, self.gamma = T, nkd_gamma

    def forward(self, student, teacher, targets):
        z_s, z_t = student["logits"].float(), teacher["logits"].float()
        target_mask = F.one_hot(targets, z_s.shape[1]).to(z_s.dtype)
        log_p_s = (F.log_softmax(z_s, dim=1) * target_mask).sum(1)
        p_t = (F.softmax(z_t, dim=1) * target_mask).sum(1)
        # the target class left out of the softmax (its probability 0 in fp32), as dkd does
        log_q_s = F.log_softmax(z_s / self.T - MASK * target_mask, dim=1)
        q_t = F.softmax(z_t / self.T - MASK * target_mask, dim=1)
        nontarget = -(q_t * log_q_s).sum(1).mean()
        return {"target": -(p_t * log_p_s).mean(), "nontarget": self.gamma * self.T ** 2 * nontarget}
