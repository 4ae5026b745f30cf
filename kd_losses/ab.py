import torch.nn as nn

from .base import PRE_RELU_STAGES, KDMethod, connector, register
from .stage import train_student_alone


def activation_boundary_loss(s, t, margin):
    """Squared hinge that puts each student response on the teacher's side of zero with a margin:
    (s + m)^2 where the teacher is off (t <= 0) and s > -m, (s - m)^2 where the teacher is on
    (t > 0) and s <= m; mean over all elements."""
    off = (t <= 0) & (s > -margin)
    on = (t > 0) & (s <= margin)
    return ((s + margin).pow(2) * off + (s - margin).pow(2) * on).mean()


@register("ab")
class ActivationBoundaries(KDMethod):
    """Activation boundary loss (see activation_boundary_loss) on every pre-ReLU stage output,
    averaged over the stages; where the shapes differ, a connector maps the student's to the
    teacher's (the connector rule).

    As in the seed zoo the loss is used only in a stage run alone before training (the student
    and the connectors learn it for ab_epochs epochs, weighted by ab_stage_weight); training proper
    then uses cross-entropy only, hence the default KD weight 0."""

    paper = ("Heo et al. 2019, Knowledge Transfer via Distillation of Activation Boundaries "
             "Formed by Hidden Neurons")
    summary = ("squared hinge that puts each pre-ReLU response on the teacher's side of 0 with margin m, averaged "
               "over the stages; connector where shapes differ")
    weight_source = "seed zoo; cross-entropy only after the stage"
    stage = "the student (and connectors) learns the AB loss alone, 50 epochs"
    deviations = ("margin 2 and element mean (seed zoo; the paper and RepDistiller: margin 1, sum / batch / 1000 "
                  "with layer weights)")
    features = PRE_RELU_STAGES
    default_weight = 0.0
    has_stage = True
    hyperparameters = {"ab_margin": (2.0, "margin m of the activation boundary hinge"),
                       "ab_epochs": (50, "epochs of the stage that trains the student on the AB loss alone"),
                       "ab_lr": (0.01, "initial SGD learning rate of that stage (x0.1 after 60 and 80 percent of it)"),
                       "ab_stage_weight": (10.0, "weight of the AB loss during that stage")}

    def __init__(self, student_shapes, teacher_shapes, ab_margin, ab_epochs, ab_lr, ab_stage_weight):
        super().__init__(student_shapes, teacher_shapes)
        self.margin, self.epochs, self.lr, self.stage_weight = ab_margin, ab_epochs, ab_lr, ab_stage_weight
        self.connectors = nn.ModuleDict({k: connector(student_shapes[k], teacher_shapes[k]) for k in self.stages})

    def train_stage(self, student, teacher, batches):
        """Trains the student (and the connectors) on the AB loss alone; see stage.train_student_alone."""
        train_student_alone(self, student, teacher, batches, self.epochs, self.lr, self.stage_weight)

    def forward(self, student, teacher, targets):
        losses = [activation_boundary_loss(self.connectors[k](student[k]).float(), teacher[k].float(), self.margin)
                  for k in self.stages]
        return sum(losses) / len(losses)
