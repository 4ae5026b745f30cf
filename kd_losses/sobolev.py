import torch
import torch.nn.functional as F

from .base import KDMethod, register


def unit_input_gradients(logits, images, targets, create_graph):
    """The gradient of the summed target-class logits w.r.t. the images, flattened per sample and
    L2-normalised. For a network in eval mode row n is d logit_n[target_n] / d image_n; in train mode
    BN couples the batch, so row n also holds the other samples' logits' dependence on image n."""
    score = logits.float().gather(1, targets[:, None]).sum()
    (grads,) = torch.autograd.grad(score, images, create_graph=create_graph)
    return F.normalize(grads.float().flatten(1), dim=1)


@register("sobolev")
class Sobolev(KDMethod):
    """Mean squared difference between the student's and the teacher's input gradients of the
    target-class logit, each flattened per sample and L2-normalised (the mean runs over samples and
    pixels). The student's gradient keeps its graph, so the loss trains the student through a double
    backward; the teacher's gradient comes from its own pass with autograd on."""

    paper = "Czarnecki et al. 2017, Sobolev Training for Neural Networks"
    summary = ("MSE of the per-sample L2-normalised input gradients of the target-class logit (student with a "
               "double backward)")
    weight_source = "seed zoo"
    deviations = "normalised gradients as in Jacobian matching (Srinivas & Fleuret 2018), as the seed zoo"
    default_weight = 20.0
    compilable = False  # double backward
    double_backward = True
    reads_teacher = False  # its outputs come from its own run of the teacher, with autograd
    runs_teacher = True

    def step(self, student, images, targets, indices, teacher_out):
        images = images.detach().requires_grad_()
        logits = student(images)
        grad_s = unit_input_gradients(logits, images, targets, create_graph=True)
        # the teacher's input gradient needs a pass with autograd on
        images_t = images.detach().requires_grad_()
        grad_t = unit_input_gradients(self.teacher(images_t), images_t, targets, create_graph=False)
        return logits, F.mse_loss(grad_s, grad_t)
