import torch
import torch.nn.functional as F

from .base import LOGIT_STAND, KDMethod, as_float, register, standardize

# the temperatures the official code uses beside its base temperature T, in its order
OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
# The official recipes (CIFAR-100). MLKD's configs (Jin-Ying/Multi-Level-Logit-Distillation,
# configs/cifar100/ours/*.yaml L11-12): LR 0.025, 0.01 for MobileNet and ShuffleNet students; 240 epochs
# but on the pairs below; the LR decays at 150, 180 and 210 whatever the epoch count. The logit
# standardisation code's (sunshangquan/logit-standardization-KD, configs/cifar100/mlkd/*.yaml): 480
# epochs, 960 for resnet32x4 -> ShuffleV1/V2; LR as MLKD's but on the pairs in LS_LR.
LR, MOBILE_LR, MOBILE = 0.025, 0.01, ("MobileNetV2", "ShuffleV1", "ShuffleV2")
EPOCHS = {("resnet32x4", "ShuffleV1"): 960, ("resnet32x4", "ShuffleV2"): 960, ("ResNet50", "MobileNetV2"): 480,
          ("vgg13", "MobileNetV2"): 480, ("wrn_40_2", "ShuffleV1"): 480}
LS_EPOCHS = {("resnet32x4", "ShuffleV1"): 960, ("resnet32x4", "ShuffleV2"): 960}
LS_LR = {("vgg13", "vgg8"): 0.01, ("wrn_40_2", "MobileNetV2"): 0.005}
MILESTONES = [150, 180, 210]


def instance_term(z_s, z_t, T):
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1), reduction="batchmean") * T ** 2


def class_term(p_s, p_t):
    """Squared distance of the C x C class correlations P^T P of the N x C probabilities, over C."""
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / p_s.shape[1]


def batch_term(p_s, p_t):
    """Squared distance of the N x N sample correlations P P^T of the N x C probabilities, over N."""
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]


def share_at_or_below_median(values):
    """The fraction of `values` at or below their median (numpy's percentile 50, linear interpolation)."""
    return (values <= values.quantile(0.5)).float().mean()


@register("mlkd")
class MultiLevelKD(KDMethod):
    """Multi-level logit distillation on a weak view (the usual crop and flip) and a strong view
    (data.DeviceLoader.strong_view: crop, flip, RandAugment and cutout), as the official code
    computes it, at the temperatures T, 3, 5, 2 and 6 (p^T: softmax(logits / T)):
      instance: the KD term at each temperature on the weak view times the share of samples whose
          teacher confidence (max softmax at T = 1, weak view) is at or below the batch median, plus
          the KD term at T, 3 and 5 on the strong view and at 2 and 6 on the weak view again;
      class:    class_term at each temperature on the weak view, times the share of classes whose
          summed teacher probability is at or below the median over classes;
      batch:    batch_term at each temperature on the weak view, times the share of samples above.
    The student's logits on both views are returned, so the cross-entropy is taken on both.
    Quirks of the official code that ours keeps, since its published numbers come from them: the
    masks scale batch means (each term times the share of samples or classes kept, about 1/2)
    rather than select samples or classes; the strong view's instance terms at 2 and 6 read the
    weak view's logits; the strong view enters the instance term only (the code computes its class
    and batch terms and leaves them out of the loss; ours does not compute them). With logit_stand,
    the instance terms read the z-scored logits (base.standardize), the class and batch terms the
    raw ones, as the logit standardisation code does. Returned as named terms 'instance', 'class'
    and 'batch'."""

    paper = "Jin et al. 2023, Multi-Level Logit Distillation"
    summary = ("instance (KD), class (`P^T P`) and batch (`P P^T`) relations of the probabilities at T, 3, 5, 2, 6, "
               "on a weak view and a strongly augmented one (RandAugment and cutout), CE on both views")
    weight_source = ("official code (Jin-Ying/Multi-Level-Logit-Distillation, mdistiller's KD defaults: KD 0.9 on "
                     "every term, CE 0.1 on each view)")
    deviations = ("none from the official code, whose quirks are kept: each mask scales a batch mean by the share "
                  "it keeps (about 1/2) rather than selecting samples or classes; the strong view's instance terms "
                  "at 2 and 6 read the weak view's logits; its class and batch terms are left out of the loss. The "
                  "strong view is made on the device (`rand_augment.py`): PIL's ops bit for bit, but Rotate moves "
                  "about 2 pixels in a million to a neighbour")
    default_weight = 0.9
    default_ce_weight = 0.1
    strong_view = True
    hyperparameters = {"T": (4.0, "the base softmax temperature, used beside 3, 5, 2 and 6"),
                       "logit_stand": LOGIT_STAND}
    # the logit standardisation code's MLKD runs (log names: T, KD weight): T 2, KD 9 (CE stays 0.1) but on
    # these pairs; its table's other pairs have no log (resnet56 -> resnet20, wrn_40_2 -> MobileNetV2)
    logit_stand_settings = {
        None: {"T": 2.0, "kd_weight": 9.0},
        ("resnet32x4", "ShuffleV2"): {"kd_weight": 6.0}, ("vgg13", "vgg8"): {"kd_weight": 6.0},
        ("vgg13", "MobileNetV2"): {"kd_weight": 6.0}}

    @classmethod
    def official_recipe(cls, dataset, teacher, student, logit_stand):
        """The official configs' LR (on CIFAR-10 too: the CIFAR-10 recipe's 0.1 makes the loss explode in the
        first epoch) and, on CIFAR-100, their epochs with the LR decaying at 150, 180 and 210."""
        lr = MOBILE_LR if student in MOBILE else LR
        if logit_stand:
            lr = LS_LR.get((teacher, student), lr)
        epochs = LS_EPOCHS.get((teacher, student), 480) if logit_stand else EPOCHS.get((teacher, student), 240)
        recipe = {"lr": lr}
        if dataset == "cifar100" and epochs != 240:
            recipe.update(epochs=epochs, lr_milestones=MILESTONES)
        return recipe

    def __init__(self, student_shapes, teacher_shapes, T, logit_stand):
        super().__init__(student_shapes, teacher_shapes)
        self.T, self.logit_stand = T, logit_stand

    def step(self, student, images, targets, indices, teacher_out):
        weak, strong = images
        logits = (student(weak), student(strong))  # two forwards, so BN sees each view alone, as the official
        with torch.autocast(weak.device.type, enabled=False):  # the loss in fp32 (see KDMethod.step)
            loss = self(as_float({"logits": logits[0], "strong_logits": logits[1]}), as_float(teacher_out), targets)
        return logits, loss

    def forward(self, student, teacher, targets):
        weak_s, weak_t = student["logits"], teacher["logits"]
        strong_s, strong_t = student["strong_logits"], teacher["strong_logits"]
        temperatures = (self.T,) + OTHER_TEMPERATURES
        p_t = F.softmax(weak_t, dim=1)
        sample_share = share_at_or_below_median(p_t.max(1).values)
        class_share = share_at_or_below_median(p_t.sum(0))
        if self.logit_stand:
            kd_weak = standardize(weak_s), standardize(weak_t)
            kd_strong = standardize(strong_s), standardize(strong_t)
        else:
            kd_weak, kd_strong = (weak_s, weak_t), (strong_s, strong_t)
        instance = sample_share * sum(instance_term(*kd_weak, T) for T in temperatures)
        instance = instance + sum(instance_term(*kd_strong, T) for T in temperatures[:3])
        instance = instance + sum(instance_term(*kd_weak, T) for T in temperatures[3:])
        class_, batch = 0, 0
        for T in temperatures:
            p_s_T, p_t_T = F.softmax(weak_s / T, dim=1), F.softmax(weak_t / T, dim=1)
            class_ = class_ + class_term(p_s_T, p_t_T)
            batch = batch + batch_term(p_s_T, p_t_T)
        return {"instance": instance, "class": class_share * class_, "batch": sample_share * batch}
