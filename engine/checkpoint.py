"""Checkpoints: writing them atomically, loading them safely, and putting a run back on resume.

last.pt holds everything a resume needs (weights, the method's state, optimizer, LR schedule,
random generators, history); best.pt the same without the RESUME_ONLY parts. Both hold plain
types and tensors only and load with torch.load(..., weights_only=True).
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from models import build_model
from models.imported import to_our_state_dict
from utils import UserError, barrier, is_main, log, write_atomic

CHECKPOINT_FORMAT = "kdzoo-checkpoint-v1"
RESUME_ONLY = ("optimizer", "scheduler", "rng", "history")  # in last.pt, not in best.pt


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def load_weights_only(path):
    """torch.load on the CPU of a file that holds tensors and plain types only; anything that needs
    code to unpickle, a truncated file or a missing one is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, arbitrary code: all refused the same way
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable checkpoint ({first_line}).") from None


def load_checkpoint(path):
    """Loads a checkpoint written by this project, refusing anything that needs code to unpickle."""
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = " (a RepDistiller or mdistiller teacher needs --teacher-arch)" if isinstance(ckpt, dict) and \
            "model" in ckpt else ""
        raise UserError(f"{path} is not a checkpoint written by train_base.py or train_kd.py{hint}.")
    return ckpt


def import_teacher(path, arch, dataset, num_classes):
    """A teacher checkpoint written by RepDistiller or mdistiller (a dict whose "model" entry is the
    state dict of their network `arch`; the file records neither the architecture nor the data set)
    converted once into ours, saved beside it as <name>.kdzoo.pt and reused while the source's
    contents are unchanged. Returns the path of the converted checkpoint."""
    theirs = load_weights_only(path)
    converted = os.path.splitext(path)[0] + ".kdzoo.pt"
    source_sha256 = file_sha256(path)
    if os.path.isfile(converted):
        ckpt = load_checkpoint(converted)
        if ckpt.get("imported_from", {}).get("sha256") == source_sha256 and ckpt["arch"] == arch \
                and ckpt["dataset"] == dataset:
            log(f"reusing {converted}, converted earlier from {path}")
            return converted
    if isinstance(theirs, dict) and theirs.get("format") == CHECKPOINT_FORMAT:
        raise UserError(f"{path} is this project's checkpoint, which records its architecture; drop --teacher-arch.")
    if not isinstance(theirs, dict) or not isinstance(theirs.get("model"), dict):
        raise UserError(f"{path} has no 'model' entry holding a state dict, as RepDistiller's and mdistiller's "
                        f"checkpoints do.")
    model = build_model(arch, num_classes)
    model.load_state_dict(to_our_state_dict(arch, theirs["model"], model, path), strict=False)
    recorded = {k: float(theirs[k]) for k in ("epoch", "best_acc") if k in theirs}  # their own log of the run
    save_atomic({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes, "shortcut": "projection",
                 "dataset": dataset, "model": model.state_dict(),
                 "imported_from": {"path": path, "sha256": source_sha256, **recorded}}, converted)
    log(f"converted {path} (a RepDistiller/mdistiller {arch}"
        + "".join(f", {k} {v:g}" for k, v in recorded.items()) + f" as recorded in it) to {converted}")
    return converted


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def unwrap(module):
    """The plain module inside torch.compile's and DistributedDataParallel's wrappers, so that
    saved keys never carry their '_orig_mod.' or 'module.' prefixes."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def load_weights(module, state_dict, what):
    """Strict load that names the first mismatching key instead of PyTorch's multi-line report."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        raise UserError(f"{what} lacks the weight '{missing[0]}' ({len(missing)} missing in all).")
    if unexpected:
        raise UserError(f"{what} has the unexpected weight '{unexpected[0]}' ({len(unexpected)} in all).")
    for k, v in own.items():
        if v.shape != state_dict[k].shape:
            raise UserError(f"{what} has '{k}' of shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}.")
    module.load_state_dict(state_dict)


def generator_states(loader):
    """What a resume needs of the random generators: the data generator's (the same on every
    process) and, per process, the global CPU generator's and, on CUDA, the training device's.
    Under torchrun every process takes part (the states are gathered to all)."""
    device = loader.labels.device
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    states = {**own, "data": loader.generator.get_state()}
    if dist.is_initialized():
        states["processes"] = [None] * dist.get_world_size()
        dist.all_gather_object(states["processes"], own)
    return states


def epoch_checkpoint(task, optimizer, scheduler, generators, info, fields):
    """last.pt's contents after an epoch: info (architecture, config, ...), fields (epoch, accuracy,
    history, ...), the student's weights, the method's state and everything a resume needs."""
    task = unwrap(task)
    return {"format": CHECKPOINT_FORMAT, **info, **fields, "model": task.student.state_dict(),
            "method": {k: v for k, v in task.state_dict().items() if not k.startswith("student.")},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": generators}


def save_epoch(checkpoint, output_dir, improved):
    """Writes last.pt, and best.pt (without the resume-only parts) when the epoch improved."""
    if improved:
        save_atomic({k: v for k, v in checkpoint.items() if k not in RESUME_ONLY}, os.path.join(output_dir, "best.pt"))
    save_atomic(checkpoint, os.path.join(output_dir, "last.pt"))


def restore(task, optimizer, scheduler, loader, ckpt, path):
    """Puts a last.pt back: weights (strictly), optimizer, LR schedule and every random generator."""
    load_weights(task, {**{f"student.{k}": v for k, v in ckpt["model"].items()}, **ckpt["method"]},
                 f"The checkpoint {path}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_generators(ckpt["rng"], loader)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"The checkpoint {path} cannot be resumed ({type(e).__name__}: {e}).") from None


def restore_generators(states, loader):
    """The inverse of generator_states. A run saved on another kind of device (CPU <-> CUDA), whose
    data generator state cannot go into this one's, continues from a data seed derived from it:
    still fixed by the checkpoint, but not the batches an uninterrupted run would have seen."""
    device = loader.labels.device
    own = states
    if dist.is_initialized() and len(states.get("processes") or ()) == dist.get_world_size():
        own = states["processes"][dist.get_rank()]
    torch.set_rng_state(own["torch"])
    data = states["data"]
    if data.numel() == loader.generator.get_state().numel():
        loader.generator.set_state(data)
    else:
        loader.generator.manual_seed(int.from_bytes(hashlib.sha256(data.numpy().tobytes()).digest()[:8], "little"))
        log("note: the run was saved on another kind of device, whose data generator cannot continue here; "
            "the batches from now on are drawn from a seed derived from it, so they differ from an "
            "uninterrupted run's")
    saved = own.get("cuda")
    if device.type == "cuda" and isinstance(saved, list):  # checkpoints before: every visible GPU's
        saved = saved[device.index] if device.index < len(saved) else None
    if device.type == "cuda" and saved is not None:
        torch.cuda.set_rng_state(saved, device)


def run_stage(task, loader, key, output_dir, cache_dir=None):
    """Runs the method's stage before training (FT's paraphraser, AB's and FSP's student
    initialisation) and saves its result, the whole task, as stage.pt in the run folder. With a
    cache_dir, a result there for the same key (teacher, student, seed, data, settings) is loaded
    instead, and a new one is kept there for later runs. Under torchrun rank 0 runs the stage and
    the other processes load its result."""
    stage_path = os.path.join(output_dir, "stage.pt")
    if is_main():
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cached = cache_dir and os.path.join(cache_dir, f"stage-{key['method']}-{digest}.pt")
        if cached and os.path.exists(cached):
            load_weights(task, load_checkpoint(cached)["task"], f"The stage result {cached}")
            log(f"{key['method']} stage: loaded its result from {cached}")
        else:  # on a copy of the loader, so that the student then sees the batches it would without a stage
            task.method.train_stage(task.student, task.teacher, loader.unsharded_copy())
        result = {"format": CHECKPOINT_FORMAT, "key": key, "task": task.state_dict()}
        save_atomic(result, stage_path)
        if cached and not os.path.exists(cached):
            save_atomic(result, cached)
            log(f"{key['method']} stage: result kept in {cached} for later runs")
    barrier()
    if not is_main():
        load_weights(task, load_checkpoint(stage_path)["task"], "The stage result")
