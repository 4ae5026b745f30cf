import torch
import torch.nn.functional as F

from .base import KDMethod, register

# CAT-KD's mdistiller/engine/cfg.py: beta (CAT_loss_weight), CAM size (CAM_RESOLUTION), IF_NORMALIZE
DEFAULT_SETTINGS = (400.0, 2, True)
# (teacher, student) -> (beta, CAM size, normalise) from the official configs/cifar100/CAT_KD/*.yaml; the two
# other pairs of the CRD benchmark (resnet110 -> resnet20, ResNet50 -> vgg8) have no config: DEFAULT_SETTINGS
SETTINGS_BY_PAIR = {
    ("resnet56", "resnet20"): (0.7, 2, False), ("resnet110", "resnet32"): (1.8, 2, False),
    ("resnet32x4", "resnet8x4"): (15.0, 2, False), ("wrn_40_2", "wrn_16_2"): (12.0, 2, False),
    ("wrn_40_2", "wrn_40_1"): (1.5, 2, False), ("vgg13", "vgg8"): (4.5, 2, False),
    ("vgg13", "MobileNetV2"): (15.0, 2, True), ("ResNet50", "MobileNetV2"): (40.0, 2, True),
    ("resnet32x4", "ShuffleV1"): (600.0, 4, True), ("resnet32x4", "ShuffleV2"): (600.0, 4, True),
    ("wrn_40_2", "ShuffleV1"): (80.0, 4, True),
}


def pooled_cams(feature_map, fc_weight, size):
    """Class activation maps (the classifier's weights as a 1x1 convolution, no bias) average-pooled to
    size x size: N x classes x size x size. Pooled first, the same by linearity, and cheaper."""
    return torch.einsum("kc,nchw->nkhw", fc_weight, F.adaptive_avg_pool2d(feature_map, size))


@register("catkd")
class ClassAttentionTransfer(KDMethod):
    """beta * MSE of the two networks' class activation maps, average-pooled to size x size and, where
    normalised, L2-normalised per class over the positions (CAT-KD's CAT_loss). A network's CAMs are its
    classifier's weights applied at every position of the map it average-pools for that classifier:
    its last stage output (through its head in MobileNetV2 and ShuffleV2, pre_pool_map). The student's
    use its own, trained fc weights, the teacher's its fc weights read in attach().

    beta, size and normalisation are the official config's for the pair (SETTINGS_BY_PAIR), else
    cfg.py's defaults (400, 2, normalised): beta and size as settings_by_pair (--catkd-beta and
    --catkd-size override them), normalisation set by attach(), which sees both networks. The CE
    weight of every official config is 1.
    The official options off by default (binarised CAMs, CAT alone without CE, CAMs of some classes
    only) are not implemented."""

    paper = "Guo et al. 2023, Class Attention Transfer Based Knowledge Distillation"
    summary = "beta times the MSE of class activation maps (fc weights on the pre-pool map) pooled to 2x2 or 4x4"
    weight_source = "CAT-KD's configs"
    deviations = "the student keeps its fc bias (CAT-KD's student has none: its logits are its pooled CAMs)"
    features = ("pre_pool",)
    default_weight = 1.0  # beta carries the scale
    hyperparameters = {
        "catkd_beta": (DEFAULT_SETTINGS[0], "weight of the CAM loss (CAT-KD's per pair: docs/methods.md)"),
        "catkd_size": (DEFAULT_SETTINGS[1], "size the CAMs are pooled to (CAT-KD's per pair: docs/methods.md)"),
    }
    settings_by_pair = {pair: {"catkd_beta": beta, "catkd_size": size}
                        for pair, (beta, size, _) in SETTINGS_BY_PAIR.items()}

    def __init__(self, student_shapes, teacher_shapes, catkd_beta, catkd_size):
        super().__init__(student_shapes, teacher_shapes)
        self.beta, self.size, self.normalize = catkd_beta, catkd_size, DEFAULT_SETTINGS[2]

    def attach(self, student, teacher, train_labels):
        self.normalize = SETTINGS_BY_PAIR.get((teacher.arch, student.arch), DEFAULT_SETTINGS)[2]
        # not persistent: attach() reads it again from the teacher on resume
        self.register_buffer("teacher_fc", teacher.network.fc.weight.detach().clone(), persistent=False)

    def step(self, student, images, targets, indices, teacher_out):
        logits, feats = student(images, features=True)
        # the CAMs and the loss in fp32, as the base step computes every loss
        with torch.autocast(images.device.type, enabled=False):
            # the student's classifier weights make its CAMs, so the CAM loss trains them too
            s_cams = pooled_cams(feats["pre_pool"].float(), student.fc.weight.float(), self.size)
            t_cams = pooled_cams(teacher_out["pre_pool"].float(), self.teacher_fc.float(), self.size)
            loss = self({"cams": s_cams}, {"cams": t_cams}, targets)
        return logits, loss

    def forward(self, student, teacher, targets):
        """student/teacher: dicts with 'cams', the pooled class activation maps (N x classes x size x size)."""
        s, t = student["cams"], teacher["cams"]
        if self.normalize:
            s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
        return self.beta * F.mse_loss(s, t)
