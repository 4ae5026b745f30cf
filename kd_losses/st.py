import torch.nn.functional as F

from .base import LOGIT_STAND, KDMethod, register, standardize


@register("st")
class SoftTarget(KDMethod):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the batch; with
    logit_stand, of the z-scored logits (base.standardize)."""

    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    summary = "`T^2 KL(p_t^T ‖ p_s^T)`, batch mean"
    weight_source = "seed zoo"
    default_weight = 0.1
    hyperparameters = {"T": (4.0, "softmax temperature"),
                       "logit_stand": LOGIT_STAND}
    # the logit standardisation code's KD runs (configs and log names): T 2, KD 9, CE 0.1 but on these pairs
    logit_stand_settings = {
        None: {"T": 2.0, "kd_weight": 9.0, "ce_weight": 0.1},
        ("vgg13", "vgg8"): {"T": 3.0}, ("resnet110", "resnet20"): {"T": 4.0, "kd_weight": 12.0},
        ("vgg13", "MobileNetV2"): {"T": 3.0}, ("ResNet50", "MobileNetV2"): {"T": 3.0, "kd_weight": 1.0},
        ("resnet32x4", "wrn_16_2"): {"T": 3.0}, ("resnet32x4", "wrn_40_2"): {"T": 3.0},
        ("wrn_40_2", "MobileNetV2"): {"T": 3.0}}

    def __init__(self, student_shapes, teacher_shapes, T, logit_stand):
        super().__init__(student_shapes, teacher_shapes)
        self.T, self.logit_stand = T, logit_stand

    def forward(self, student, teacher, targets):
        z_s, z_t = student["logits"].float(), teacher["logits"].float()
        if self.logit_stand:
            z_s, z_t = standardize(z_s), standardize(z_t)
        log_p_s = F.log_softmax(z_s / self.T, dim=1)
        p_t = F.softmax(z_t / self.T, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="batchmean") * self.T ** 2
