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
      than one forward of each network (input gradients, adversarial samples, a peer network, a
      second view: strong_view = True)
  train_stage(student, teacher, batches)  a stage run alone before training (has_stage = True),
      with kd_losses.stage.train_stage, the one stage loop
  classify(student_features)              the student's logits, for a method that replaces its
      classifier (replaces_classifier = True: SimKD); evaluation and checkpoints then use it
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = {}
# Names a method's `features` may hold besides a network's own keys ('stem', 'pool'): they stand for
# stage outputs, which differ in number between networks (3 in a ResNet, 4 in a VGG), and each
# method instance resolves them for its pair (resolve_features): every stage output after its ReLU,
# the same before it, the last stage and the one before it.
STAGES = ("stages",)
PRE_RELU_STAGES = ("stages_pre",)
LAST_STAGE, SECOND_LAST_STAGE = "stage-1", "stage-2"
STAGE_WORDS = {"stages": "stages", "stages_pre": "pre-ReLU stages", LAST_STAGE: "last stage",
               SECOND_LAST_STAGE: "stage before the last"}
# the switch of the logit methods that the logit standardisation code extends (a hyper-parameter spec)
LOGIT_STAND = (False, "z-score each sample's logits before the temperature (logit standardisation, Sun et al. "
                      "2024); brings the official runs' T and weights (and DKD's beta) for the pair, unless given")
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
    default_ce_weight = 1.0    # the cross-entropy's weight unless --ce-weight is given
    replaces_classifier = False  # True: the student predicts through the method (classify), in training and tests
    small_batch_steps = False  # True: a small batch's gradient is many times a full one's (train_kd.py notes it)
    # True: training batches carry a strongly augmented second view (data.DeviceLoader.strong_view); step()
    # then gets images as (weak, strong) and the teacher's outputs on the strong view as 'strong_<name>', and
    # may return the student's logits on both, (weak, strong), each of which gets the cross-entropy (MLKD)
    strong_view = False
    # (teacher, student) -> {hyper-parameter: value} where the official configs set another value than
    # the hyper-parameter's default for that pair; config.resolve applies them unless given, and saves them
    settings_by_pair = {}
    # for a method with the `logit_stand` switch: what --logit-stand brings where not given (None), and
    # the pairs (teacher, student) where the official runs used other values
    logit_stand_settings = {}

    @classmethod
    def teacher_cache_refusal(cls):
        """Why the method cannot take the teacher's outputs from the teacher cache, or "" when it can:
        it can when it reads the teacher's outputs, all of them in CACHED_OUTPUTS, and never runs the
        teacher itself."""
        if cls.runs_teacher:
            return "it runs the teacher itself"
        if cls.strong_view:
            return "it reads the teacher on a strongly augmented view, which the cache does not hold"
        if not cls.reads_teacher:
            return "it reads no teacher outputs"
        uncached = [STAGE_WORDS.get(name, name) for name in cls.features if name not in CACHED_OUTPUTS]
        if uncached:
            return f"it reads the teacher's {', '.join(uncached)}, and only {' and '.join(CACHED_OUTPUTS)} are cached"
        return ""

    @classmethod
    def official_recipe(cls, dataset, teacher, student, logit_stand):
        """The recipe settings (config.RECIPES' keys) the official code trains this pair with where they
        are not the data set's recipe; config.resolve applies them unless given. Most methods: none."""
        return {}

    @classmethod
    def logit_stand_defaults(cls, teacher, student):
        """The defaults --logit-stand brings for this pair (flags, kd_weight, ce_weight)."""
        return {**cls.logit_stand_settings[None], **cls.logit_stand_settings.get((teacher, student), {})}

    def __init__(self, student_shapes, teacher_shapes, **hparams):
        """student_shapes/teacher_shapes: feature name -> shape of one sample, e.g. (64, 8, 8).
        Sets self.features to the feature names this pair's networks give (resolve_features) and
        self.stages to the stage outputs among them."""
        super().__init__()
        self.features = resolve_features(type(self).features, student_shapes, teacher_shapes, self.name)
        self.stages = tuple(name for name in self.features if name.startswith("stage"))

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

    def classify(self, student_features):
        """The student's logits from its features (model(x, features=True)), for a method that
        replaces the student's classifier (replaces_classifier)."""
        raise NotImplementedError

    def forward(self, student, teacher, targets):
        raise NotImplementedError


def stage_names(shapes):
    """The network's stage outputs after their ReLU, in order: ('stage1', 'stage2', 'stage3', ...);
    named also where `shapes` hold only their pre-ReLU versions."""
    numbers = {int(match.group(1)) for match in (re.fullmatch(r"stage(\d+)(_pre)?", name) for name in shapes) if match}
    return tuple(f"stage{number}" for number in sorted(numbers))


def resolve_features(names, student_shapes, teacher_shapes, method):
    """`names` (a method's `features`) with STAGES, PRE_RELU_STAGES, LAST_STAGE and SECOND_LAST_STAGE
    replaced by the pair's stage names. A method that reads stages compares them one to one, so the
    two networks must have as many; ValueError otherwise."""
    student_stages, teacher_stages = stage_names(student_shapes), stage_names(teacher_shapes)
    reads_stages = any(name in STAGES + PRE_RELU_STAGES + (LAST_STAGE, SECOND_LAST_STAGE) for name in names)
    if reads_stages and len(student_stages) != len(teacher_stages):
        raise ValueError(f"{method} compares the two networks stage by stage, and the student has "
                         f"{len(student_stages)} stages where the teacher has {len(teacher_stages)}")
    resolved = []
    for name in names:
        if name in STAGES:
            resolved += student_stages
        elif name in PRE_RELU_STAGES:
            resolved += [f"{stage}_pre" for stage in student_stages]
        elif name in (LAST_STAGE, SECOND_LAST_STAGE):
            resolved.append(student_stages[int(name[5:])])
        else:
            resolved.append(name)
    return tuple(resolved)


def same_size(student, teacher):
    """The two feature maps with the larger one average-pooled to the smaller's spatial size, as
    RepDistiller does for the methods that compare maps position by position across networks."""
    size_s, size_t = student.shape[-2:], teacher.shape[-2:]
    if size_s[0] > size_t[0]:
        student = F.adaptive_avg_pool2d(student, size_t)
    elif size_t[0] > size_s[0]:
        teacher = F.adaptive_avg_pool2d(teacher, size_s)
    return student, teacher


def standardize(logits):
    """Each sample's logits z-scored (logit standardisation, Sun et al. 2024): (z - mean) / (1e-7 + std),
    with the unbiased std over classes, as the official code."""
    return (logits - logits.mean(1, keepdim=True)) / (1e-7 + logits.std(1, keepdim=True))


def as_float(tensors):
    return {name: value.float() for name, value in tensors.items()}


def connector(student_shape, teacher_shape):
    """The connector rule, for methods that compare student and teacher features element-wise:
    nothing where the shapes match; otherwise a layer + BN on the student's side that maps its shape
    to the teacher's: for pooled vectors a linear layer; for maps of the same size a 1x1 conv, and
    across sizes RepDistiller's rule: a 3x3 stride-2 conv from twice the teacher's size, a 4x4
    stride-2 transposed conv from half of it, a (1 + s - t)-wide conv from any larger size s. A
    smaller size other than half is an error."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    c_s, c_t = student_shape[0], teacher_shape[0]
    if len(student_shape) == 1:
        return nn.Sequential(nn.Linear(c_s, c_t, bias=False), nn.BatchNorm1d(c_t))
    s, t = student_shape[1], teacher_shape[1]
    if s == t:
        layer = nn.Conv2d(c_s, c_t, 1, bias=False)
    elif s == 2 * t:
        layer = nn.Conv2d(c_s, c_t, 3, 2, 1, bias=False)
    elif 2 * s == t:
        layer = nn.ConvTranspose2d(c_s, c_t, 4, 2, 1, bias=False)
    elif s > t:
        layer = nn.Conv2d(c_s, c_t, 1 + s - t, bias=False)
    else:
        raise ValueError(f"no connector maps student features {tuple(student_shape)} to teacher features "
                         f"{tuple(teacher_shape)}: the student's map is smaller, and not half the teacher's")
    return nn.Sequential(layer, nn.BatchNorm2d(c_t))


def conv_bn_lrelu(in_channels, out_channels, transposed=False):
    """3x3 (transposed) convolution, BN and LeakyReLU(0.1): FT's paraphraser and translator layers."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(conv(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU(0.1))
