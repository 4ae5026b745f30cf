import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LOGIT_STAND, KDMethod, register, standardize

# the temperature's parameter before the sigmoid, as the official Global_T starts it: T = 1 + 20 sigmoid(1) = 15.62
INITIAL_RAW_T = 1.0


def cosine_lambda(epoch, lambda_max, loops):
    """The gradient reversal's strength at the 1-based epoch: from 0 up to lambda_max over `loops`
    epochs along half a cosine, then lambda_max (the official CosineDecay, with its sign flipped)."""
    return lambda_max * (1 - math.cos(math.pi * min(epoch, loops) / loops)) / 2


def reverse_gradient(x, lam):
    """x in the forward pass; -lam times the incoming gradient in the backward pass. (x - x.detach())
    is exactly 0 yet carries x's gradient: no custom autograd Function, so a compiled step keeps it."""
    return x.detach() - lam * (x - x.detach())


@register("ctkd")
class CurriculumTemperatureKD(KDMethod):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the batch, with
    one learnable temperature for all samples (the official global version, not the instance-wise one):
    T = ctkd_t_start + ctkd_t_range * sigmoid(theta), theta a parameter starting at 1, trained by the
    same optimizer as the student. Its gradient is reversed (gradient reversal layer on theta): the
    temperature ascends the KD loss while the student descends it, with a strength lambda that rises
    from 0 at epoch 0 to ctkd_lambda_max at epoch ctkd_lambda_loops along a cosine (cosine_lambda, set
    by start_epoch; lambda_max until then).
    The KL is taken between log-probabilities: the official form differentiates p_t log p_t through
    the learnable T, which gives 0 * inf = NaN wherever a teacher probability underflows to 0 (CTKD
    issue 9); here that gradient is 0. With logit_stand, of the z-scored logits (base.standardize)."""

    paper = "Li et al. 2023, Curriculum Temperature for Knowledge Distillation"
    summary = ("`T^2 KL(p_t^T ‖ p_s^T)`, batch mean, with one learned `T = 1 + 20 sigmoid(theta)` whose gradient is "
               "reversed with a strength rising from 0 to 1 along a cosine over 10 epochs")
    weight_source = "official code (zhengli97/CTKD, scripts/run_cifar_distill.sh: KD 0.9, CE 0.1)"
    deviations = ("CE weight 1 unless `--ce-weight 0.1` (the official script's); the KL from log-probabilities on "
                  "both sides, so a teacher probability of 0 gives no NaN (CTKD issue 9); the cosine schedule only, "
                  "from 0 (the official code also has a linear one, and a settable start)")
    default_weight = 0.9
    hyperparameters = {
        "ctkd_t_start": (1.0, "lowest temperature: T = t_start + t_range * sigmoid(theta)"),
        "ctkd_t_range": (20.0, "span of the temperature above t_start (the official --t_end)"),
        "ctkd_lambda_max": (1.0, "final strength of the temperature's gradient reversal"),
        "ctkd_lambda_loops": (10, "epochs over which the reversal's strength rises from 0 to lambda_max"),
        "logit_stand": LOGIT_STAND,
    }
    # the logit standardisation code's CTKD runs (its CTKD/scripts/run_cifar_distill.sh and log names): KD 9,
    # CE 0.1 on every pair, the temperature still learned
    logit_stand_settings = {None: {"kd_weight": 9.0, "ce_weight": 0.1}}

    def __init__(self, student_shapes, teacher_shapes, ctkd_t_start, ctkd_t_range, ctkd_lambda_max,
                 ctkd_lambda_loops, logit_stand):
        super().__init__(student_shapes, teacher_shapes)
        self.logit_stand = logit_stand
        self.t_start, self.t_range = ctkd_t_start, ctkd_t_range
        self.lambda_max, self.loops = ctkd_lambda_max, ctkd_lambda_loops
        self.raw_T = nn.Parameter(torch.tensor(INITIAL_RAW_T))  # learnable: trained and checkpointed
        # a tensor, updated in place, so a compiled step reads it rather than baking in a float; not
        # persistent: start_epoch sets it again from the epoch on resume
        self.register_buffer("lam", torch.tensor(float(ctkd_lambda_max)), persistent=False)

    def start_epoch(self, epoch, epochs):
        self.lam.fill_(cosine_lambda(epoch, self.lambda_max, self.loops))

    def temperature(self):
        return self.t_start + self.t_range * torch.sigmoid(reverse_gradient(self.raw_T, self.lam))

    def forward(self, student, teacher, targets):
        T = self.temperature()  # the logits come in fp32 from step() (or in float64, for the tests)
        z_s, z_t = student["logits"], teacher["logits"]
        if self.logit_stand:
            z_s, z_t = standardize(z_s), standardize(z_t)
        log_p_s = F.log_softmax(z_s / T, dim=1)
        log_p_t = F.log_softmax(z_t / T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T ** 2
