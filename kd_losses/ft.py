import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import progress_bar
from .base import KDMethod, conv_bn_lrelu, register


@register("ft")
class FactorTransfer(KDMethod):
    """L1 distance between the student's and the teacher's factors, each flattened per sample and
    L2-normalised. The teacher's factor is the encoder of a paraphraser trained first, alone, to
    reconstruct the teacher's last stage output; the student's comes from a translator trained
    with it. BN is kept in both on CIFAR-10 and CIFAR-100 alike."""

    paper = "Kim et al. 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer"
    features = ("stage3",)
    default_weight = 200.0
    has_stage = True
    hyperparameters = {"ft_k": (0.5, "paraphrase rate: factor channels = k x teacher channels"),
                       "ft_epochs": (30, "epochs of the paraphraser stage"),
                       "ft_lr": (0.01, "constant SGD learning rate of the paraphraser stage")}

    def __init__(self, student_shapes, teacher_shapes, ft_k, ft_epochs, ft_lr):
        super().__init__(student_shapes, teacher_shapes)
        c_s, c_t = student_shapes["stage3"][0], teacher_shapes["stage3"][0]
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

    def train_stage(self, student, teacher_outputs, batches):
        """Trains the paraphraser to reconstruct the teacher's last stage output, then freezes it.

        teacher_outputs(images) -> feature dict of the frozen teacher; batches: a training loader.
        The student takes no part."""
        self.paraphraser.requires_grad_(True)
        self.paraphraser.train()
        optimizer = torch.optim.SGD(self.paraphraser.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        for epoch in range(1, self.epochs + 1):
            total, seen = 0.0, 0
            for images, _, _ in progress_bar(batches, f"paraphraser {epoch}/{self.epochs}"):
                target = teacher_outputs(images)["stage3"].float()
                loss = F.mse_loss(self.paraphraser["decoder"](self.paraphraser["encoder"](target)), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.detach() * len(images), seen + len(images)
            if epoch == 1 or epoch == self.epochs or epoch % 10 == 0:
                print(f"ft stage epoch {epoch}/{self.epochs}: paraphraser reconstruction mse {float(total) / seen:.5f}",
                      flush=True)
        self.paraphraser.requires_grad_(False)
        self.paraphraser.eval()

    def forward(self, student, teacher, targets):
        with torch.no_grad():
            factor_t = self.paraphraser["encoder"](teacher["stage3"])
        factor_s = self.translator(student["stage3"])
        return F.l1_loss(F.normalize(factor_s.float().flatten(1), dim=1),
                         F.normalize(factor_t.float().flatten(1), dim=1))
