import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PRE_RELU_STAGES, STAGES, KDMethod, register

# (teacher, student) -> loss weight where the official CIFAR-100 script (dvlab-research/ReviewKD,
# CIFAR-100/script/reviewKD.sh) sets another than the default 1 (mdistiller's one CIFAR-100 config,
# resnet32x4 -> resnet8x4, agrees: 5); resnet110 -> resnet32 is 1 there, and the other pairs of the
# CRD benchmark are not in it
WEIGHT_BY_PAIR = {("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0, ("wrn_40_2", "ShuffleV1"): 5.0,
                  ("resnet32x4", "resnet8x4"): 5.0, ("resnet32x4", "ShuffleV1"): 5.0,
                  ("resnet32x4", "ShuffleV2"): 8.0, ("resnet56", "resnet20"): 0.6}
HCL_SIZES = (4, 2, 1)


def hcl(student, teacher):
    """Hierarchical context loss of one level: the MSE of the maps, plus the MSE after adaptive
    average pooling to each of 4, 2, 1 that is smaller than the map, weighted 1/2, 1/4, ... in that
    order, all divided by the sum of the weights used."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in HCL_SIZES:
        if size >= student.shape[-2]:
            continue
        weight /= 2
        total += weight
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
    return loss / total


class AttentionBasedFusion(nn.Module):
    """ABF: a 1x1 conv + BN to the mid width; below the deepest level, fused with the residual from
    the level below (nearest-upsampled to this level's size) by a 2-channel sigmoid attention map
    (1x1 conv with bias) that weighs the two; nearest-resized to the teacher's size; a 3x3 conv + BN
    to the teacher's width. Returns the output and the mid-width map before that conv, the next
    level's residual."""

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.expand = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # the official initialisation
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(self, x, residual, out_size):
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.expand(x), x


@register("reviewkd")
class ReviewKD(KDMethod):
    """weight * warm-up * the sum over levels of HCL(ABF output, teacher feature).

    Levels, shallow to deep: the stage outputs and the pooled vector (as a 1x1 map); the student's
    stages after their ReLU, the teacher's before it (the stem is not used, as in the official
    code). The ABFs run deepest first, each fusing its student feature with the residual of the
    level below, and map it to the teacher's width and spatial size (cross-family pairs differ in
    both). Mid width: min(reviewkd_max_mid, the student's pooled width), as the official code.
    warm-up: min(epoch / reviewkd_warmup, 1) for the 1-based epoch, set by start_epoch; 1 until then.
    reviewkd_weight: 1 unless given, or the pair's in WEIGHT_BY_PAIR (settings_by_pair)."""

    paper = "Chen et al. 2021, Distilling Knowledge via Knowledge Review"
    summary = ("HCL between the teacher's pre-ReLU stages and pooled vector and the student's stages and pooled "
               "vector fused deepest first by attention-based fusion, with a linear warm-up `min(epoch / 20, 1)`")
    weight_source = "official CIFAR-100 script, per pair"
    deviations = ("warm-up on the 1-based epoch as mdistiller (the official CIFAR-100 code counts from 0); "
                  "weight 1 (the official default) for the pairs its script leaves out: resnet110 -> resnet20, "
                  "vgg13 -> vgg8, vgg13 / ResNet50 -> MobileNetV2, ResNet50 -> vgg8")
    features = STAGES + PRE_RELU_STAGES + ("pool",)
    default_weight = 1.0  # reviewkd_weight carries the scale
    hyperparameters = {
        "reviewkd_weight": (1.0, "weight of the review loss (the official script's per pair where it sets "
                                 "another: docs/methods.md)"),
        "reviewkd_warmup": (20, "epochs of linear warm-up of the KD term"),
        "reviewkd_max_mid": (512, "largest ABF mid width (the mid width is min(this, the student's pooled width))"),
    }
    settings_by_pair = {pair: {"reviewkd_weight": weight} for pair, weight in WEIGHT_BY_PAIR.items()}

    def __init__(self, student_shapes, teacher_shapes, reviewkd_weight, reviewkd_warmup, reviewkd_max_mid):
        super().__init__(student_shapes, teacher_shapes)
        post = [name for name in self.stages if not name.endswith("_pre")]
        self.student_levels = post + ["pool"]
        self.teacher_levels = [f"{name}_pre" for name in post] + ["pool"]
        self.weight = reviewkd_weight
        self.warmup = reviewkd_warmup
        mid = min(reviewkd_max_mid, student_shapes["pool"][0])
        # the teacher's spatial size per level, the pooled vector's 1 x 1 last
        self.out_sizes = [tuple(teacher_shapes[name][1:]) for name in self.teacher_levels[:-1]] + [(1, 1)]
        deepest = len(self.student_levels) - 1
        self.abfs = nn.ModuleList(
            AttentionBasedFusion(student_shapes[s][0], mid, teacher_shapes[t][0], fuse=level < deepest)
            for level, (s, t) in enumerate(zip(self.student_levels, self.teacher_levels)))
        # a tensor, updated in place, so a compiled step reads it rather than baking in a float;
        # not persistent: start_epoch sets it again on resume
        self.register_buffer("warmup_factor", torch.tensor(1.0), persistent=False)

    def start_epoch(self, epoch, epochs):
        self.warmup_factor.fill_(min(epoch / self.warmup, 1.0))

    def forward(self, student, teacher, targets):
        def maps(outputs, levels):
            return [outputs[name].float() for name in levels[:-1]] + [outputs["pool"].float()[:, :, None, None]]
        student_maps, teacher_maps = maps(student, self.student_levels), maps(teacher, self.teacher_levels)
        loss, residual = 0.0, None
        for level in reversed(range(len(self.abfs))):
            out, residual = self.abfs[level](student_maps[level], residual, self.out_sizes[level])
            loss = loss + hcl(out, teacher_maps[level])
        return self.weight * self.warmup_factor * loss
