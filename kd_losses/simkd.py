import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDMethod, register


@register("simkd")
class SimKD(KDMethod):
    """MSE between the student's pre-pool map through a projector and the teacher's pre-pool map
    (the larger of the two average-pooled to the smaller's size first), and the student's logits
    from the teacher's own classifier on the projected map, average-pooled: in training (for the CE,
    0 by default, and the accuracy) and in evaluation (classify). The projector is SimKD's
    bottleneck: 1x1 conv to C_t / factor, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to C_t, BN, ReLU.
    The teacher's classifier is copied in attach() and frozen; with the projector it is part of the
    method's state, so every checkpoint of the run carries both. The student's own classifier is
    unused, and frozen so that it is neither trained nor expected to get a gradient."""

    paper = "Chen et al. 2022, Knowledge Distillation with the Reused Teacher Classifier"
    summary = ("MSE of the projected student pre-pool map and the teacher's; the student predicts with the "
               "teacher's classifier on the projected map")
    weight_source = "official code (DefangChen/SimKD README: `-c 0 -d 0 -b 1`, CE 0, feature loss 1)"
    features = ("pre_pool",)
    default_weight = 1.0
    default_ce_weight = 0.0
    replaces_classifier = True
    hyperparameters = {"simkd_factor": (2, "bottleneck factor of the projector (C_t / factor in its middle)")}

    def __init__(self, student_shapes, teacher_shapes, simkd_factor):
        super().__init__(student_shapes, teacher_shapes)
        (c_s, size_s, _), (c_t, size_t, _) = student_shapes["pre_pool"], teacher_shapes["pre_pool"]
        mid = c_t // simkd_factor
        self.projector = nn.Sequential(
            nn.Conv2d(c_s, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU())
        self.teacher_fc = nn.Linear(c_t, teacher_shapes["logits"][0]).requires_grad_(False)
        self.size = min(size_s, size_t)  # where the two maps meet

    def attach(self, student, teacher, train_labels):
        self.teacher_fc.load_state_dict(teacher.network.fc.state_dict())
        student.fc.requires_grad_(False)

    def project(self, student_map):
        """The student's map at the size where the two maps meet, through the projector."""
        return self.projector(at_size(student_map, self.size))

    def predict(self, projected):
        """The teacher's classifier on the projected map, average-pooled: the student's logits."""
        return self.teacher_fc(F.adaptive_avg_pool2d(projected, 1).flatten(1))

    def classify(self, student_features):
        return self.predict(self.project(student_features["pre_pool"].float()))

    def step(self, student, images, targets, indices, teacher_out):
        _, feats = student(images, features=True)
        # the projector, the classifier and the loss in fp32, as the base step computes every loss
        with torch.autocast(images.device.type, enabled=False):
            projected = self.project(feats["pre_pool"].float())
            target = at_size(teacher_out["pre_pool"].float(), self.size)
            loss = self({"projected": projected}, {"pre_pool": target}, targets)
        return self.predict(projected), loss

    def forward(self, student, teacher, targets):
        """student: {'projected': its projected map}; teacher: {'pre_pool': its map at the same size}."""
        return F.mse_loss(student["projected"], teacher["pre_pool"])


def at_size(feature_map, size):
    """The map average-pooled to size x size where it is larger."""
    return F.adaptive_avg_pool2d(feature_map, size) if feature_map.shape[-1] > size else feature_map
