"""The tasks the loop trains, and the frozen teacher.

A task is an nn.Module whose forward(images, targets, indices, views, strong) returns
(student_logits, terms), terms mapping a name ('ce', 'kd', ...) to a weighted scalar loss whose sum
is optimised; indices are the batch's positions in the training set, views its augmentations and
strong its strongly augmented second view or None (data.DeviceLoader). start_epoch(epoch, epochs)
runs before each epoch. Everything a task holds as a submodule (student, connectors, translators, a
peer) is trained and checkpointed. The teacher is a plain object, so it is never part of that.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_losses import METHODS, feature_shapes
from models import build_model, fold_batchnorm
from utils import log

from .checkpoint import load_checkpoint, load_weights


def compiled(function, device):
    """torch.compile with CUDA graphs on CUDA (they remove the launch overhead that dominates these
    small nets on a GPU) and static shapes: a partial last batch gets a graph of its own, and the
    full batches keep theirs rather than switching to a slower dynamic-shape one."""
    return torch.compile(function, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)


class Supervised(nn.Module):
    """Cross-entropy alone: train_base.py's task."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images, targets, indices, views, strong=None):
        return self.student_loss(images, targets)

    def student_loss(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits.float(), targets)}

    def start_epoch(self, epoch, epochs):
        pass

    def predictor(self):
        """The model that evaluation runs: the student."""
        return self.student

    def compile_steps(self, device):
        """torch.compile the training step's forward (and so its backward)."""
        self.student_loss = compiled(self.student_loss, device)


class Teacher:
    """The frozen teacher, and the only code that runs it. Not an nn.Module, so it is never in a
    task's module tree, optimizer, checkpoint or DDP wrapper.

    network: the network as loaded, in eval mode with no gradients; methods read it in attach()
        (OFD its BN statistics, DML its architecture).
    folded:  the same network with its BN folded into the convolutions (the same outputs to
        rounding; its forward measured 1.09x faster in fp32, 1.44x in bf16 channels_last on a CPU),
        in the training memory format: for methods that run the teacher with autograd (input
        gradients, an attack) by calling the Teacher.
    outputs(images, names): its logits and the named features, under inference mode, in bf16 with
        amp (in training and in a stage alike, so a compiled forward is compiled once): what a
        method's loss reads.
    """

    def __init__(self, network, memory_format=torch.contiguous_format, compile=False, amp=False):
        self.network = network.eval().requires_grad_(False)
        self.arch, self.num_classes, self.shortcut = network.arch, network.num_classes, network.shortcut
        self.folded = fold_batchnorm(copy.deepcopy(self.network)).to(memory_format=memory_format)
        self.device, self.amp = next(network.parameters()).device, amp
        self.inference_forward = compiled(self.folded, self.device) if compile else self.folded

    @classmethod
    def load(cls, path, device, memory_format=torch.contiguous_format, compile=False, amp=False):
        """The teacher in a train_base.py checkpoint (config.resolve has checked its data set)."""
        ckpt = load_checkpoint(path)
        network = build_model(ckpt["arch"], ckpt["num_classes"], ckpt.get("shortcut", "projection"))
        load_weights(network, ckpt["model"], f"The teacher checkpoint {path}")
        return cls(network.to(device), memory_format, compile, amp)

    def __call__(self, images, features=False):
        return self.folded(images, features=features)

    def outputs(self, images, names=()):
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, feats = self.inference_forward(images, features=True)
        # inference tensors cannot be saved for backward, so the few a method reads are cloned
        return {"logits": logits.clone(), **{k: feats[k].clone() for k in names}}


class Distiller(nn.Module):
    """Student + KD method, with the teacher beside them. A KD weight of 0 leaves the method and
    the teacher out of the step altogether (and freezes the method's parameters): the step is then
    the baseline's. With a teacher_cache (engine.teacher_cache) the teacher's outputs are read from
    it instead of computed."""

    def __init__(self, student, teacher, method, ce_weight, kd_weight, teacher_cache=None):
        super().__init__()
        self.student, self.method, self.teacher, self.teacher_cache = student, method, teacher, teacher_cache
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        if kd_weight == 0:
            method.requires_grad_(False)

    def compile_steps(self, device):
        """torch.compile the student's step (forward, loss and so backward), unless the method's
        step cannot be compiled (it says so); the teacher compiles its own forward (Teacher)."""
        self.baseline_loss = compiled(self.baseline_loss, device)
        if self.method.compilable:
            self.student_loss = compiled(self.student_loss, device)
        else:
            log(f"--compile: the {self.method.name} step stays eager (it cannot be compiled); "
                f"the teacher's forward is compiled")

    def start_epoch(self, epoch, epochs):
        self.method.start_epoch(epoch, epochs)

    def predictor(self):
        """The model that evaluation runs: the student, or, where the method replaces its classifier,
        the student predicting through the method (SimKD: its projector and the teacher's classifier)."""
        return MethodPredictor(self.student, self.method) if self.method.replaces_classifier else self.student

    def forward(self, images, targets, indices, views, strong=None):
        if self.kd_weight == 0:
            return self.baseline_loss(images, targets)
        if self.teacher_cache is not None:
            teacher_out = self.teacher_cache.outputs(indices, views)
        elif self.method.reads_teacher:
            teacher_out = self.teacher.outputs(images, self.method.features)
        else:
            teacher_out = {}
        if strong is not None:  # a strong_view method: its step gets both views, and the teacher's outputs on both
            images = (images, strong)
            teacher_out.update({f"strong_{name}": value
                                for name, value in self.teacher.outputs(strong, self.method.features).items()})
        return self.student_loss(images, targets, indices, teacher_out)

    def baseline_loss(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits.float(), targets)}

    def student_loss(self, images, targets, indices, teacher_out):
        logits, kd = self.method.step(self.student, images, targets, indices, teacher_out)
        # the cross-entropy of every view the student saw (a strong_view method returns the logits of both)
        views = logits if isinstance(logits, tuple) else (logits,)
        terms = {"ce": self.ce_weight * sum(F.cross_entropy(view.float(), targets) for view in views)}
        if isinstance(kd, dict):
            terms.update({f"kd_{name}": self.kd_weight * value for name, value in kd.items()})
        else:
            terms["kd"] = self.kd_weight * kd
        return views[0], terms


class MethodPredictor(nn.Module):
    """A student whose logits come from a method's classify() on its features."""

    def __init__(self, student, method):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, images):
        _, feats = self.student(images, features=True)
        return self.method.classify(feats)


def load_predictor(path, device):
    """The model a checkpoint predicts with, in eval mode (BN from its running statistics): its network,
    or, where the run's method replaces the network's classifier (the checkpoint's "predictor" is
    "method"), the network through that method's saved parts (built from the checkpoint's KD settings
    and architectures)."""
    ckpt = load_checkpoint(path)
    network = build_model(ckpt["arch"], ckpt["num_classes"], ckpt.get("shortcut", "projection"))
    load_weights(network, ckpt["model"], path)
    if ckpt.get("predictor", "student") == "student":
        return network.to(device).eval()
    kd = ckpt["kd"]
    cls = METHODS[kd["method"]]
    teacher_shapes = feature_shapes(build_model(ckpt["teacher"]["arch"], ckpt["num_classes"]))
    method = cls(feature_shapes(network), teacher_shapes, **{key: kd[key] for key in cls.hyperparameters})
    load_weights(method, {k[len("method."):]: v for k, v in ckpt["method"].items() if k.startswith("method.")},
                 path)
    return MethodPredictor(network, method).to(device).eval()
