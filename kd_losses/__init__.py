"""KD methods, one file each. METHODS (name -> class) is the one list of methods: train_kd.py's
--method choices and flags (config.py) and docs/methods.md come from it. To add a method, write a
file with a @register'ed KDMethod subclass and import it below."""
import torch

# importing registers them; this order (the seed zoo's list, then DKD and the methods after it) is the order
# of --help and docs/methods.md
from . import logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab, sp, sobolev, bss, cc, lwm, irg, vid  # noqa: F401, I001
from . import ofd, afd, crd, dml, dkd, reviewkd, dist, ctkd, nkd, kdsvd, catkd, simkd, mlkd  # noqa: F401, I001
from .base import METHODS, KDMethod, register  # noqa: F401


def feature_shapes(model, image_size=32):
    """Per-sample shape of every named feature and of the logits, from one forward pass of a zero batch
    in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, feats = model(torch.zeros(2, 3, image_size, image_size, device=device), features=True)
    model.train(was_training)
    return {"logits": tuple(logits.shape[1:]), **{k: tuple(v.shape[1:]) for k, v in feats.items()}}


def default_hyperparameters(name, teacher=None, student=None):
    """The method's hyper-parameters unless given: their defaults, with the official settings for the pair
    (teacher, student) where they differ (settings_by_pair)."""
    cls = METHODS[name]
    defaults = {key: spec[0] for key, spec in cls.hyperparameters.items()}
    return {**defaults, **cls.settings_by_pair.get((teacher, student), {})}


def default_weight(name, dataset):
    """The method's KD weight unless --kd-weight is given; a few depend on the data set."""
    weight = METHODS[name].default_weight
    return weight[dataset] if isinstance(weight, dict) else weight


def build_method(name, hparams, student, teacher, train_labels):
    """The method for this pair (teacher: an engine.Teacher), attached to both networks."""
    method = METHODS[name](feature_shapes(student), feature_shapes(teacher.network), **hparams)
    method.attach(student, teacher, train_labels)
    return method
