import torch
import torch.nn.functional as F

from .base import KDMethod, register, same_size, stage_names

# The stage before the last (stage2 in a ResNet), as the seed zoo. After the last stage, a GAP + linear
# head makes d logit / d feature the same at every position (the classifier row over H*W), so a map built from those gradients alone
# (the seed zoo's) is flat, and Grad-CAM reduces to the plain class activation map, a fixed linear
# read-out of features the logits already see. One stage earlier the gradients vary over H, W.


def grad_cam(logits, feature, targets, create_graph):
    """Grad-CAM of the target class (Selvaraju et al. 2017): the feature's channels weighted by the
    spatial mean of d logit[target] / d feature, summed over channels and ReLU'd: N x 1 x H x W.
    In train mode BN couples the batch (the batch's summed target logits
    are differentiated, as in the seed zoo)."""
    score = logits.float().gather(1, targets[:, None]).sum()
    (grads,) = torch.autograd.grad(score, feature, create_graph=create_graph)
    channel_weights = grads.float().mean(dim=(2, 3), keepdim=True)
    return F.relu((channel_weights * feature.float()).sum(dim=1, keepdim=True))


@register("lwm")
class LwM(KDMethod):
    """Mean absolute difference between the student's and the teacher's Grad-CAM maps of the
    target class on the stage before the last (stage2 in a ResNet), each flattened per sample and
    L2-normalised (the mean runs over samples and positions); where the maps differ in size, the
    larger is average-pooled to the smaller first. The student's map keeps its graph (a double
    backward: its channel weights are gradients); the teacher's comes from its own pass with autograd on. Channel counts may differ."""

    paper = "Dhar et al. 2019, Learning without Memorizing"
    summary = "L1 of L2-normalised Grad-CAM maps of the target class (student with a double backward)"
    weight_source = "seed zoo"
    deviations = ("the stage before the last, not the last (seed zoo); the map is the paper's Grad-CAM (weights x "
                  "feature map), where the seed zoo multiplies the weights by the gradient; element mean, not the "
                  "per-sample sum")
    default_weight = 0.4
    compilable = False  # double backward
    double_backward = True
    reads_teacher = False  # its outputs come from its own run of the teacher, with autograd
    runs_teacher = True

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__(student_shapes, teacher_shapes)
        # it reads them in its own step, so not through `features`
        self.student_stage, self.teacher_stage = stage_names(student_shapes)[-2], stage_names(teacher_shapes)[-2]

    def step(self, student, images, targets, indices, teacher_out):
        logits, feats = student(images, features=True)
        cam_s = grad_cam(logits, feats[self.student_stage], targets, create_graph=True)
        # the teacher's Grad-CAM needs a pass with autograd on, on an input that requires grad so that
        # its stage output has one
        logits_t, feats_t = self.teacher(images.detach().requires_grad_(), features=True)
        cam_t = grad_cam(logits_t, feats_t[self.teacher_stage], targets, create_graph=False).detach()
        cam_s, cam_t = (F.normalize(cam.flatten(1), dim=1) for cam in same_size(cam_s, cam_t))
        return logits, F.l1_loss(cam_s, cam_t)
