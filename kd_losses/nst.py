import torch.nn.functional as F

from .base import LAST_STAGE, KDMethod, register, same_size


def polynomial_kernel_mean(a, b):
    """Mean of (a_i . b_j)^2 over all channel pairs (i, j) and the batch; a, b: N x C x HW."""
    return a.bmm(b.transpose(1, 2)).pow(2).mean()


@register("nst")
class NeuronSelectivityTransfer(KDMethod):
    """Squared MMD between the channels of the last stage outputs, each channel's spatial vector
    L2-normalised, with the polynomial kernel k(x, y) = (x . y)^2 (d = 2, c = 0, as in the seed zoo);
    where the two maps differ in size, the larger is average-pooled to the smaller first (RepDistiller)."""

    paper = "Huang & Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    summary = "squared MMD between L2-normalised channels, kernel `(x.y)^2`"
    weight_source = "seed zoo"
    deviations = "polynomial kernel d = 2, c = 0 (seed zoo)"
    features = (LAST_STAGE,)
    default_weight = 10.0

    def forward(self, student, teacher, targets):
        s, t = same_size(student[self.stages[0]].float(), teacher[self.stages[0]].float())
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
        return polynomial_kernel_mean(t, t) + polynomial_kernel_mean(s, s) - 2 * polynomial_kernel_mean(s, t)
