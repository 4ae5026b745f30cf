import torch
import torch.nn.functional as F

from .base import KDMethod, register


def bss_schedule(epoch, epochs):
    """The factor on the BSS term in `epoch` (1-based) of `epochs`, as in the seed zoo: 0 during a
    warm-up of the first 5% of the epochs (10 of 200), then 1 - 1.25 (epoch - 1) / epochs, which
    reaches 0 after 80% of the epochs (CE alone from epoch 161 of 200)."""
    if epoch <= epochs // 20:
        return 0.0
    return max(1.0 - 1.25 * (epoch - 1) / epochs, 0.0)


@register("bss")
class BSS(KDMethod):
    """KL(softmax(t / T) || softmax(s / T)) on boundary supporting samples, summed over classes and
    averaged over those samples (no T^2 factor, as in the seed zoo and the authors' code), times the
    epoch's schedule factor (see bss_schedule).

    The samples: among the batch's images that both networks classify correctly, the attack_size
    on which their softmax outputs disagree most on the other classes (sum of squared differences).
    Each is given an attack class drawn from the teacher's other classes with probability
    proportional to the teacher's softmax, then moved for `steps` iterations towards it:
    x += step_size * (p_base - p_attack + 1e-4) * g / ||g||, g = d (p_attack - p_base) / d x, p the
    teacher's softmax, base the label; a sample stops once the teacher no longer predicts the label;
    pixels stay in [-2.5, 2.5] (normalised units). The student's and the teacher's outputs on the
    moved images are compared."""

    paper = "Heo et al. 2019, Knowledge Distillation with Adversarial Samples Supporting Decision Boundary"
    summary = ("KL at T between teacher and student on boundary-supporting samples: up to 32 per batch (both nets "
               "correct, most disagreeing), moved by a 10-step attack on the teacher towards a class drawn from "
               "its softmax")
    weight_source = ("seed zoo; times a schedule: 0 for the first 5 % of the epochs, then "
                     "`max(1 − 1.25 (e−1)/E, 0)` (zero for the last 20 %)")
    deviations = ("the seed zoo's: attack on softmax probabilities, no plain KD term, no `T^2`; warm-up 5 % of "
                  "the epochs (the seed zoo's fixed 10 of 200). The authors' code attacks logits and adds KD")
    default_weight = 2.0
    compilable = False  # an attack loop with its own backward passes
    runs_teacher = True  # the attack queries the teacher
    hyperparameters = {"T": (3.0, "softmax temperature"),
                       "bss_attack_size": (32, "boundary supporting samples made per batch"),
                       "bss_steps": (10, "iterations of the attack"),
                       "bss_step_size": (0.3, "step size (eta) of the attack")}
    OVERSHOOT = 1e-4   # the reference's epsilon: keeps stepping when the two probabilities are equal
    PIXEL_BOUND = 2.5  # the reference's clamp, in normalised pixel units

    def __init__(self, student_shapes, teacher_shapes, T, bss_attack_size, bss_steps, bss_step_size):
        super().__init__(student_shapes, teacher_shapes)
        self.T, self.attack_size, self.steps, self.step_size = T, bss_attack_size, bss_steps, bss_step_size
        # a function of the epoch alone, set by start_epoch: not saved, exact after a resume
        self.register_buffer("factor", torch.ones(()), persistent=False)
        self.attacking = True  # the same, as a Python bool: no attack (and no host sync) while it is 0

    def start_epoch(self, epoch, epochs):
        factor = bss_schedule(epoch, epochs)
        self.factor.fill_(factor)
        self.attacking = factor > 0

    def choose_samples(self, student_logits, teacher_logits, targets):
        """(indices of the samples to attack, 1.0 where the sample is correctly classified by both
        networks else 0.0). Always min(attack_size, batch) indices, so that shapes never depend on
        the data and nothing waits for the device; the mask drops the others from the loss."""
        both_right = (student_logits.argmax(1) == targets) & (teacher_logits.argmax(1) == targets)
        diff = (F.softmax(teacher_logits.float(), 1) - F.softmax(student_logits.float(), 1)) ** 2
        disagreement = diff.sum(1) - diff.gather(1, targets[:, None]).squeeze(1)
        disagreement = torch.where(both_right, disagreement, -1.0)  # >= 0 where both are right
        chosen = disagreement.topk(min(self.attack_size, len(targets))).indices
        return chosen, both_right[chosen].float()

    def draw_attack_classes(self, teacher_logits):
        """For each row, a class other than the teacher's top one, drawn with probability
        proportional to the teacher's softmax (torch's default generator of the logits' device)."""
        probs, classes = F.softmax(teacher_logits.float(), 1).sort(dim=1, descending=True)
        probs, classes = probs[:, 1:], classes[:, 1:]
        draw = torch.rand(len(probs), 1, device=probs.device) * probs.sum(1, keepdim=True)
        # the first class whose cumulative probability reaches the draw
        pick = (probs.cumsum(1) < draw).sum(1).clamp(max=probs.shape[1] - 1)
        return classes.gather(1, pick[:, None]).squeeze(1)

    def attack(self, images, base_classes, attack_classes):
        """The images moved towards attack_classes on the teacher (see the class docstring)."""
        x = images.detach()
        for _ in range(self.steps):
            x.requires_grad_()
            probs = F.softmax(self.teacher(x).float(), 1)
            p_base = probs.gather(1, base_classes[:, None]).squeeze(1)
            p_attack = probs.gather(1, attack_classes[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad((p_attack - p_base).sum(), x)
            with torch.no_grad():
                not_crossed = (probs.argmax(1) == base_classes).float()
                size = self.step_size * not_crossed * (p_base - p_attack + self.OVERSHOOT)
                direction = F.normalize(grad.float().flatten(1), dim=1).view_as(grad)  # 0 where grad is 0
                x = (x + size[:, None, None, None] * direction).clamp(-self.PIXEL_BOUND, self.PIXEL_BOUND)
        return x

    def boundary_loss(self, student_logits, teacher_logits, keep):
        """KL(softmax(t / T) || softmax(s / T)) summed over classes, averaged over the rows where keep is 1."""
        log_p_s = F.log_softmax(student_logits.float() / self.T, 1)
        log_p_t = F.log_softmax(teacher_logits.float() / self.T, 1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
        return (kl * keep).sum() / keep.sum().clamp(min=1.0)

    def step(self, student, images, targets, indices, teacher_out):
        logits = student(images)
        if not self.attacking:
            return logits, self.factor.new_zeros(())
        chosen, keep = self.choose_samples(logits.detach(), teacher_out["logits"], targets)
        attack_classes = self.draw_attack_classes(teacher_out["logits"][chosen])
        boundary_images = self.attack(images[chosen], targets[chosen], attack_classes)
        with torch.no_grad():
            teacher_logits = self.teacher(boundary_images)
        # the student stays in train mode here, so this pass also updates its BN running statistics
        # with the boundary samples, as the seed zoo's does: each lies within steps x step_size (3 by
        # default) in L2 norm of a training image whose own norm is about 55, so they barely move
        student_logits = student(boundary_images)
        return logits, self.factor * self.boundary_loss(student_logits, teacher_logits, keep)
