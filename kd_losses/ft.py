import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LAST_STAGE, KDMethod, conv_bn_lrelu, register, same_size
from .stage import train_stage


@register("ft")
class FactorTransfer(KDMethod):
    """L1 distance between the student's and the teacher's factors, each flattened per sample and
    L2-normalised. The teacher's factor is the encoder of a paraphraser trained first, alone, to
    reconstruct the teacher's last stage output; the student's comes from a translator trained
    with it. Where the two factors differ in size, the larger is average-pooled to the smaller
    (RepDistiller). BN is kept in both on CIFAR-10 and CIFAR-100 alike."""

    paper = "Kim et al. 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer"
    summary = "L1 between L2-normalised factors of a translator (student) and a pre-trained paraphraser (teacher)"
    weight_source = "seed zoo"
    stage = "the paraphraser learns to reconstruct the teacher's last stage output, 30 epochs"
    deviations = "BN kept on CIFAR-100 too (the seed zoo drops it there)"
    features = (LAST_STAGE,)
    default_weight = 200.0
    has_stage = True
    hyperparameters = {"ft_k": (0.5, "paraphrase rate: factor channels = k x teacher channels"),
                       "ft_epochs": (30, "epochs of the paraphraser stage"),
                       "ft_lr": (0.01, "constant SGD learning rate of the paraphraser stage")}

    def __init__(self, student_shapes, teacher_shapes, ft_k, ft_epochs, ft_lr):
        super().__init__(student_shapes, teacher_shapes)
        self.stage_name = self.stages[0]
        c_s, c_t = student_shapes[self.stage_name][0], teacher_shapes[self.stage_name][0]
        factor = max(1, round(c_t * ft_k))
        self.epochs, self.lr = ft_epochs, ft_lr
        self.translator = nn.Sequential(conv_bn_lrelu(c_s, c_s), conv_bn_lrelu(c_s, factor),
                                        conv_bn_lrelu(factor, factor))
        self.paraphraser = nn.ModuleDict({
            "encoder": nn.Sequential(conv_bn_lrelu(c_t, c_t), conv_bn_lrelu(c_t, factor),
                                     conv_bn_lrelu(factor, factor)),
            "decoder": nn.Sequential(conv_bn_lrelu(factor, factor, True), conv_bn_lrelu(factor, c_t, True),
                                     conv_bn_lrelu(c_t, c_t, True)),
        })
        self.paraphraser.requires_grad_(False)
        self.paraphraser.eval()

    def train(self, mode=True):
        super().train(mode)
        self.paraphraser.eval()  # frozen after its stage: BN statistics must not move
        return self

    def train_stage(self, student, teacher, batches):
        """Trains the paraphraser to reconstruct the teacher's last stage output (constant LR, no
        Nesterov, as the seed zoo), then freezes it. The student takes no part."""
        self.paraphraser.requires_grad_(True)
        self.paraphraser.train()

        def reconstruction_error(images):
            target = teacher.outputs(images, self.stages)[self.stage_name].float()
            return F.mse_loss(self.paraphraser["decoder"](self.paraphraser["encoder"](target)).float(), target)
        train_stage("ft", list(self.paraphraser.parameters()), reconstruction_error, batches, self.epochs, self.lr,
                    teacher.amp, lr_steps=False, nesterov=False, what="paraphraser reconstruction mse")
        self.paraphraser.requires_grad_(False)
        self.paraphraser.eval()

    def forward(self, student, teacher, targets):
        with torch.no_grad():
            factor_t = self.paraphraser["encoder"](teacher[self.stage_name])
        factor_s, factor_t = same_size(self.translator(student[self.stage_name]), factor_t)
        return F.l1_loss(F.normalize(factor_s.float().flatten(1), dim=1),
                         F.normalize(factor_t.float().flatten(1), dim=1))
