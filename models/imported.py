"""Weights written by RepDistiller or mdistiller (the CRD benchmark's code bases, whose published
CIFAR-100 teachers most papers start from) for the networks we share with them: their state-dict
key names turned into ours. The two code bases name every module alike, so one table serves both.

Each family's rules rewrite a key's prefix; the first rule that matches applies, and a key no rule
matches keeps its name. to_our_state_dict then checks that the result is exactly our model's state
dict, key for key and shape for shape."""
import re

from utils import UserError

def stage_block(suffix=""):
    """The target for their 'layer<s>.<b>.' (stages counted from 1): our 'stages.<s-1>.<b>.'."""
    return lambda stage, block: f"stages.{stage - 1}.{block}.{suffix}"


_RESNET = [(r"layer(\d+)\.(\d+)\.downsample\.", stage_block("shortcut.")), (r"layer(\d+)\.(\d+)\.", stage_block()),
           (r"linear\.", "fc.")]
_WRN = [(r"block1\.layer\.0\.bn1\.", "bn1."),  # stage 1's first BN is our stem's BN
        (r"block(\d)\.layer\.0\.bn1\.", lambda stage: f"stage_bns.{stage - 2}."),  # it ends the stage before
        (r"bn1\.", "stage_bns.2."),  # the final BN ends stage 3
        (r"block(\d)\.layer\.(\d+)\.convShortcut\.", stage_block("shortcut.")),
        (r"block(\d)\.layer\.(\d+)\.", stage_block())]
_SHUFFLE = [(r"layer(\d+)\.(\d+)\.", stage_block()), (r"conv2\.", "head.0."), (r"bn2\.", "head.1."),
            (r"linear\.", "fc.")]
# architecture name prefix -> (their key prefix, our prefix or a function of the numbers it matched)
RULES = {
    "resnet": _RESNET, "ResNet50": _RESNET, "wrn_": _WRN,
    "vgg": [(r"block(\d)\.", lambda b: f"blocks.{b}."), (r"classifier\.", "fc.")],
    "MobileNetV2": [(r"conv1\.", "stem."), (r"blocks\.", "groups."), (r"conv2\.", "head."),
                    (r"classifier\.0\.", "fc.")],
    "ShuffleV1": _SHUFFLE, "ShuffleV2": _SHUFFLE,
}


def rename(key, rules):
    """Their key in our naming: the first rule whose pattern starts the key rewrites that part."""
    for pattern, target in rules:
        match = re.match(pattern, key)
        if match:
            prefix = target(*map(int, match.groups())) if callable(target) else target
            return prefix + key[match.end():]
    return key


def to_our_state_dict(arch, theirs, model, path):
    """`theirs` (a RepDistiller/mdistiller state dict of `arch`) as a state dict for `model` (ours, of
    the same architecture). Raises a UserError naming the first key or shape that does not fit."""
    rules = next((rules for prefix, rules in RULES.items() if arch.startswith(prefix)), None)
    if rules is None:
        raise UserError(f"--teacher-arch {arch}: no RepDistiller/mdistiller network of that name is known here "
                        f"(known: {', '.join(sorted(RULES))} and their depths).")
    ours = model.state_dict()
    converted = {}
    for key, value in theirs.items():
        if key.startswith("module."):  # saved from a DataParallel wrapper
            key = key[len("module."):]
        new = rename(key, rules)
        if new not in ours:
            raise UserError(f"{path}: its key {key!r} has no place in our {arch}; is --teacher-arch right?")
        if tuple(value.shape) != tuple(ours[new].shape):
            raise UserError(f"{path}: {key!r} has shape {tuple(value.shape)}, but our {arch} expects "
                            f"{tuple(ours[new].shape)}; is --teacher-arch (or the data set's class count) right?")
        converted[new] = value
    # a file from before PyTorch 0.4.1 has no BN batch counters: they do not change the outputs
    missing = [k for k in ours if k not in converted and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{path}: it lacks {len(missing)} of our {arch}'s weights, e.g. {missing[0]!r}; "
                        f"is --teacher-arch right?")
    return converted
