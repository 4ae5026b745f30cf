import torch
import torch.nn.functional as F

from .base import LOGIT_STAND, KDMethod, register, standardize

# subtracted from the target class's scaled logit to leave it out of a softmax, as mdistiller
# does: exp(-1000) is 0 in float32, yet every value stays finite (-inf would give 0 * inf = nan)
MASK = 1000.0
# (teacher, student) -> beta where mdistiller's CIFAR-100 configs (configs/cifar100/dkd/*.yaml) set
# another than the default 8; every other pair of the CRD benchmark keeps 8
BETA_BY_PAIR = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("wrn_40_2", "wrn_16_2"): 6.0,
                ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0}


def binary_log_probs(z, target_mask):
    """log of (P(target class), P(any other class)) under softmax(z); N x 2."""
    log_total = torch.logsumexp(z, dim=1)
    log_target = (z * target_mask).sum(1)
    log_others = torch.logsumexp(z - MASK * target_mask, dim=1)
    return torch.stack([log_target, log_others], dim=1) - log_total.unsqueeze(1)


@register("dkd")
class DecoupledKD(KDMethod):
    """warm-up * (alpha * TCKD + beta * NCKD), both at temperature T and, as in mdistiller (the
    paper's formula has no such factor), both times T^2; KLs summed over classes, averaged over
    the batch.
    TCKD: KL(b_t || b_s) of the binary distributions (P(target class), P(other classes)) of
    softmax(logits / T).
    NCKD: KL(q_t || q_s) of softmax(logits / T - 1000 * onehot(target)), i.e. the distribution
    over the non-target classes alone.
    warm-up: min(epoch / dkd_warmup, 1) for the 1-based epoch, set by start_epoch; 1 until then.
    dkd_beta: 8 unless given, or the pair's in BETA_BY_PAIR (settings_by_pair). With logit_stand, of
    the z-scored logits (base.standardize). Returned as named terms 'tckd' and 'nckd', warm-up included."""

    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation"
    summary = "`alpha TCKD + beta NCKD` at T, both times `T^2`, with a linear warm-up `min(epoch / 20, 1)`"
    weight_source = "mdistiller"
    deviations = "`T^2` on both terms as mdistiller (the paper's formula has none)"
    default_weight = 1.0  # alpha and beta carry the scale
    hyperparameters = {
        "dkd_alpha": (1.0, "weight of the target-class term"),
        "dkd_beta": (8.0, "weight of the non-target term (mdistiller's per pair where it sets another: "
                          "docs/methods.md)"),
        "T": (4.0, "softmax temperature"),
        "dkd_warmup": (20, "epochs of linear warm-up of the KD term"),
        "logit_stand": LOGIT_STAND,
    }
    settings_by_pair = {pair: {"dkd_beta": beta} for pair, beta in BETA_BY_PAIR.items()}
    # the logit standardisation code's DKD runs (log names: T, KD weight, beta): T 2, KD 9 (it multiplies
    # alpha and beta, as our KD weight does), CE 1 and the pair's beta, but on these pairs
    logit_stand_settings = {
        None: {"T": 2.0, "kd_weight": 9.0},
        ("vgg13", "vgg8"): {"kd_weight": 15.0, "dkd_beta": 2.0},
        ("wrn_40_2", "wrn_40_1"): {"kd_weight": 12.0, "dkd_beta": 2.0},
        ("wrn_40_2", "wrn_16_2"): {"kd_weight": 12.0, "dkd_beta": 2.0},
        ("resnet56", "resnet20"): {"T": 3.0, "kd_weight": 18.0, "dkd_beta": 2.0},
        ("resnet110", "resnet32"): {"kd_weight": 15.0, "dkd_beta": 2.0},
        ("resnet110", "resnet20"): {"kd_weight": 15.0, "dkd_beta": 2.0},
        ("vgg13", "MobileNetV2"): {"T": 3.0, "dkd_beta": 2.0},
        ("ResNet50", "MobileNetV2"): {"kd_weight": 15.0, "dkd_beta": 2.0},
        ("resnet32x4", "wrn_16_2"): {"dkd_beta": 2.0},
        ("wrn_40_2", "MobileNetV2"): {"kd_weight": 15.0, "dkd_beta": 2.0},
        ("wrn_40_2", "resnet8x4"): {"kd_weight": 18.0, "dkd_beta": 2.0}}

    def __init__(self, student_shapes, teacher_shapes, dkd_alpha, dkd_beta, T, dkd_warmup, logit_stand):
        super().__init__(student_shapes, teacher_shapes)
        self.alpha, self.beta, self.T, self.warmup, self.logit_stand = dkd_alpha, dkd_beta, T, dkd_warmup, logit_stand
        # a tensor, updated in place, so a compiled step reads it rather than baking in a float;
        # not persistent: start_epoch sets it again on resume
        self.register_buffer("warmup_factor", torch.tensor(1.0), persistent=False)

    def start_epoch(self, epoch, epochs):
        self.warmup_factor.fill_(min(epoch / self.warmup, 1.0))

    def forward(self, student, teacher, targets):
        z_s, z_t = student["logits"].float(), teacher["logits"].float()
        if self.logit_stand:
            z_s, z_t = standardize(z_s), standardize(z_t)
        z_s, z_t = z_s / self.T, z_t / self.T
        target_mask = F.one_hot(targets, z_s.shape[1]).to(z_s.dtype)
        tckd = F.kl_div(binary_log_probs(z_s, target_mask), binary_log_probs(z_t, target_mask),
                        reduction="batchmean", log_target=True)
        nckd = F.kl_div(F.log_softmax(z_s - MASK * target_mask, dim=1),
                        F.log_softmax(z_t - MASK * target_mask, dim=1), reduction="batchmean", log_target=True)
        scale = self.warmup_factor * self.T ** 2
        return {"tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}
