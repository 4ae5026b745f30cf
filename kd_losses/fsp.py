import torch.nn.functional as F

from .base import STAGES, KDMethod, register
from .stage import train_student_alone


def fsp_matrix(first, second):
    """N x C1 x C2 Gram matrix (1 / HW) sum over positions of first(h, w) second(h, w)^T, the larger
    map average-pooled to the smaller one's size first."""
    if first.shape[2:] != second.shape[2:]:
        if first.shape[2] * first.shape[3] > second.shape[2] * second.shape[3]:
            first = F.adaptive_avg_pool2d(first, second.shape[2:])
        else:
            second = F.adaptive_avg_pool2d(second, first.shape[2:])
    positions = first.shape[2] * first.shape[3]
    return first.flatten(2).bmm(second.flatten(2).transpose(1, 2)) / positions


@register("fsp")
class FlowOfSolutionProcedure(KDMethod):
    """Mean squared difference of the student's and the teacher's FSP matrices (see fsp_matrix)
    between consecutive features (stem -> stage1, stage1 -> stage2, ..., post-ReLU), averaged over
    the pairs. The matrices are compared entry by entry, so student and teacher
    need equal channel counts; there is no connector (the paper has none).

    As in the seed zoo (and the paper's first stage) the loss is used only in a stage run alone
    before training (the student learns it for fsp_epochs epochs); training proper then uses
    cross-entropy only, hence the default KD weight 0."""

    paper = ("Yim et al. 2017, A Gift from Knowledge Distillation: Fast Optimization, Network "
             "Minimization and Transfer Learning")
    summary = ("MSE of FSP (Gram) matrices of consecutive stages (`/HW`, the larger map pooled), averaged over the "
               "pairs; channel counts must match pair by pair (no connector)")
    weight_source = "seed zoo, RepDistiller; cross-entropy only after the stage"
    stage = ("the student learns the FSP loss alone for 50 epochs (SGD, lr x0.1 after 60 % and 80 %: the seed "
             "zoo's 30/10/10 epochs)")
    deviations = "stage of 50 epochs (seed zoo; RepDistiller 30)"
    features = ("stem", *STAGES)
    default_weight = 0.0
    has_stage = True
    hyperparameters = {"fsp_epochs": (50, "epochs of the stage that trains the student on the FSP loss alone"),
                       "fsp_lr": (0.01, "initial SGD learning rate of that stage (x0.1 after 60 and 80 percent of it)"),
                       "fsp_stage_weight": (1.0, "weight of the FSP loss during that stage")}

    def __init__(self, student_shapes, teacher_shapes, fsp_epochs, fsp_lr, fsp_stage_weight):
        super().__init__(student_shapes, teacher_shapes)
        for name in self.features:
            if student_shapes[name][0] != teacher_shapes[name][0]:
                raise ValueError(f"FSP needs equal channel counts, got {student_shapes[name][0]} and "
                                 f"{teacher_shapes[name][0]} at {name}")
        self.epochs, self.lr, self.stage_weight = fsp_epochs, fsp_lr, fsp_stage_weight

    def train_stage(self, student, teacher, batches):
        """Trains the student on the FSP loss alone; see stage.train_student_alone."""
        train_student_alone(self, student, teacher, batches, self.epochs, self.lr, self.stage_weight)

    def forward(self, student, teacher, targets):
        losses = [F.mse_loss(fsp_matrix(student[a].float(), student[b].float()),
                             fsp_matrix(teacher[a].float(), teacher[b].float()))
                  for a, b in zip(self.features, self.features[1:])]
        return sum(losses) / len(losses)
