"""What every KD method shares: the registry, the base class and the connector rule.

A method is an nn.Module built from the student's and the teacher's feature shapes and its own
hyper-parameters. forward(student, teacher, targets) gets two dicts holding 'logits' and the
features named in `features` (see models/resnet.py for the names) and returns the KD loss as a
tensor, or a dict of named terms that are summed. Learnable parts are submodules.

Most methods need nothing else. The hooks below are for the few that do; each has a no-op default:
  attach(student, teacher, train_labels)  once, before training: read the networks (the teacher is
      an engine.Teacher: its `network` as loaded, BN included), or size a memory bank by the
      training set
  start_epoch(epoch, epochs)              before each training epoch (1-based): weight schedules
  step(student, images, targets, indices, teacher_out)
                                          the whole training step, for methods that need more
      than one forward of each network (input gradients, adversarial samples, a peer network)
  train_stage(student, teacher, batches)  a stage run alone before training (has_stage = True),
      with kd_losses.stage.train_stage, the one stage loop
"""
import torch
import torch.nn as nn

METHODS = {}
# the stage outputs every model exposes (see models/resnet.py), after and before their last ReLU
STAGES = ("stage1", "stage2", "stage3")
PRE_RELU_STAGES = ("stage1_pre", "stage2_pre", "stage3_pre")
# the teacher outputs small enough per image to keep for every augmented view (engine/teacher_cache.py)
CACHED_OUTPUTS = ("logits", "pool")


def register(name):
    def add(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return add


class KDMethod(nn.Module):
    paper = ""                 # short citation (docs/methods.md)
    summary = ""               # what it computes, one line (docs/methods.md)
    weight_source = ""         # where default_weight comes from, e.g. "seed zoo" (docs/methods.md)
    stage = ""                 # what the stage before training does; "" without one (has_stage False)
    deviations = ""            # where ours differs from the paper; "" where it does not
    features = ()              # feature names read besides 'logits'
    default_weight = 1.0       # the weight of the KD term unless --kd-weight is given
    hyperparameters = {}       # argument name -> (default, help); each becomes a --flag
    has_stage = False          # True for a method that trains something alone before the student
    reads_teacher = True       # False: the teacher's outputs are not computed (DML reads a peer instead)
    runs_teacher = False       # True: the step calls the teacher itself (input gradients, an attack)
    compilable = True          # False: --compile leaves the step eager (double backward, data-dependent loops)
    double_backward = False    # True: the step differentiates through a gradient (not with --sync-bn)
    negatives_per_sample = 0   # > 0: the training loader adds that many other-class sample indices (CRD)

    @classmethod
    def teacher_cache_refusal(cls):
        """Why the method cannot take the teacher's outputs from the teacher cache, or "" when it can:
        it can when it reads the teacher's outputs, all of them in CACHED_OUTPUTS, and never runs the
        teacher itself."""
        if cls.runs_teacher:
            return "it runs the teacher itself"
        if not cls.reads_teacher:
            return "it reads no teacher outputs"
        uncached = [name for name in cls.features if name not in CACHED_OUTPUTS]
        if uncached:
            return f"it reads the teacher's {', '.join(uncached)}, and only {' and '.join(CACHED_OUTPUTS)} are cached"
        return ""

    def __init__(self, student_shapes, teacher_shapes, **hparams):
        """student_shapes/teacher_shapes: feature name -> shape of one sample, e.g. (64, 8, 8)."""
        super().__init__()

    def attach(self, student, teacher, train_labels):
        """Called once before training with the student, the engine.Teacher and the training labels.
        The default keeps the teacher for a step that runs it itself (input gradients, an attack):
        calling it runs its BN-folded network with autograd. A Teacher is not an nn.Module, so it is
        neither trained, checkpointed nor moved with the method."""
        self.teacher = teacher

    def start_epoch(self, epoch, epochs):
        """Called before each training epoch (1-based) of `epochs`."""

    def step(self, student, images, targets, indices, teacher_out):
        """One training step: (student logits, KD loss or dict of terms). `teacher_out` holds the
        teacher's logits and this method's features (computed under inference mode); `indices` are
        the batch's positions in the training set (N x (1 + negatives_per_sample) when
        negatives_per_sample > 0, column 0 the sample itself)."""
        if self.features:
            logits, feats = student(images, features=True)
            outputs = {"logits": logits, **{k: feats[k] for k in self.features}}
        else:
            logits = student(images)
            outputs = {"logits": logits}
        # the loss (connectors included) in fp32: under bf16 autocast, .float() inputs alone would
        # still leave its matrix products in bf16
        with torch.autocast(images.device.type, enabled=False):
            loss = self(as_float(outputs), as_float(teacher_out), targets)
        return logits, loss

    def forward(self, student, teacher, targets):
        raise NotImplementedError


def as_float(tensors):
    return {name: value.float() for name, value in tensors.items()}


def connector(student_shape, teacher_shape):
    """The connector rule, for methods that compare student and teacher features element-wise:
    nothing where the shapes match; where only the channel counts differ, a 1x1 conv + BN on the
    student's side (a linear layer + BN for pooled vectors); different spatial sizes are an error."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise ValueError(f"student features {tuple(student_shape)} and teacher features "
                         f"{tuple(teacher_shape)} differ in spatial size")
    c_s, c_t = student_shape[0], teacher_shape[0]
    if len(student_shape) == 1:
        return nn.Sequential(nn.Linear(c_s, c_t, bias=False), nn.BatchNorm1d(c_t))
    return nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))


def conv_bn_lrelu(in_channels, out_channels, transposed=False):
    """3x3 (transposed) convolution, BN and LeakyReLU(0.1): FT's paraphraser and translator layers."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(conv(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU(0.1))
