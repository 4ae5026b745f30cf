import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import STAGES, KDMethod, connector, register

EPS = 1e-6  # keeps the per-channel normalisation finite for an all-zero channel


def channel_attention(channels, hidden_channels):
    """An SE-style block on the pooled teacher feature: 1x1 conv, ReLU, 1x1 conv (with biases)."""
    layers = nn.Sequential(nn.Conv2d(channels, hidden_channels, 1), nn.ReLU(),
                           nn.Conv2d(hidden_channels, channels, 1))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return layers


def unit_channels(feature):
    """Each channel's H x W map divided by its L2 norm."""
    return feature / (feature.norm(dim=(2, 3), keepdim=True) + EPS)


@register("afd")
class AttentiveFeatureDistillation(KDMethod):
    """Channel-weighted distance between the student's and the teacher's stage outputs (post-ReLU):
    each channel's map is L2-normalised, the squared difference averaged over its H x W positions,
    and the channels summed with weights rho; mean over the batch, averaged over the stages.
    rho = sigmoid(SE block(global average pool of the teacher's feature)), divided by its sum over
    the channels, per sample; the SE block (hidden channels = afd_att_f x channels) learns with
    the student. This is the seed zoo's version: it replaced the paper's attention, which it found
    unstable, by the SE block. Where the widths differ, a 1x1 conv + BN connector maps the
    student's channels to the teacher's."""

    paper = "Wang et al. 2020, Pay Attention to Features, Transfer Learn Faster CNNs"
    summary = ("channel-attention-weighted MSE of per-channel-normalised maps, attention from an SE block on the "
               "teacher's map, averaged over the stages")
    weight_source = "seed zoo"
    deviations = ("the seed zoo's SE-block attention, not the paper's (the seed zoo found it unstable); connector "
                  "where widths differ")
    features = STAGES
    default_weight = 500.0
    hyperparameters = {"afd_att_f": (1.0, "hidden channels of the attention block = att_f x channels")}

    def __init__(self, student_shapes, teacher_shapes, afd_att_f):
        super().__init__(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleDict({k: connector(student_shapes[k], teacher_shapes[k]) for k in self.stages})
        self.attentions = nn.ModuleDict()
        for name in self.stages:
            channels = teacher_shapes[name][0]
            self.attentions[name] = channel_attention(channels, max(1, int(channels * afd_att_f)))

    def forward(self, student, teacher, targets):
        losses = []
        for name in self.stages:
            s, t = self.connectors[name](student[name]).float(), teacher[name].float()
            rho = torch.sigmoid(self.attentions[name](F.adaptive_avg_pool2d(t, 1)).flatten(1).float())
            rho = rho / rho.sum(dim=1, keepdim=True)
            distance = (unit_channels(s) - unit_channels(t)).pow(2).mean(dim=(2, 3))
            losses.append((rho * distance).sum(dim=1).mean())
        return sum(losses) / len(losses)
