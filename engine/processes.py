"""Processes: the device and rank, torchrun's process group and DDP, reductions over processes,
the end-of-run replica check, and stopping cleanly on a signal."""
import datetime
import inspect
import os
import shlex
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from utils import UserError, log

# how long a process waits for the others at a collective: rank 0 may run a method's stage (up to
# 50 epochs) while the others wait at a barrier, far past NCCL's default of 10 minutes
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=6)


def setup_device(name, deterministic=False):
    """(device, rank, world_size) for --device `name` ('auto', 'cpu' or 'cuda', already checked by
    config). Started by torchrun (WORLD_SIZE > 1), it joins the process group (NCCL on CUDA, gloo
    on the CPU) and takes the GPU of its LOCAL_RANK. deterministic: PyTorch's deterministic
    algorithms (bit-exact resume on CUDA too); otherwise cuDNN picks its fastest algorithms."""
    if deterministic:  # cuBLAS needs this before its first call to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1
    if device.type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started more processes on this node than it has GPUs ({gpus}); use "
                            f"--nproc_per_node {gpus} or fewer.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        bind = {"device_id": device} if device.type == "cuda" and "device_id" in inspect.signature(
            dist.init_process_group).parameters else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT, **bind)
    return device, dist.get_rank(), world_size


def over_processes(tensor, op="sum"):
    """The tensor reduced ('sum' or 'max') over the torchrun processes; itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def wrap_for_processes(task, device, sync_bn):
    """Under torchrun, the task in DistributedDataParallel (after SyncBatchNorm with sync_bn);
    otherwise the task itself. The optimizer built before keeps the same Parameter objects."""
    if not dist.is_initialized():
        return task
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(task)
    # buffers (BN statistics) are shared once per epoch (share_buffers), not at every step
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(task, device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync)


def share_buffers(task):
    """Under torchrun, gives every process rank 0's buffers (BN running statistics, which each
    process updated from its own part of the batch), so that evaluation and checkpoints agree."""
    if dist.is_initialized():
        for buffer in task.buffers():
            dist.broadcast(buffer, src=0)


def check_replicas(task):
    """Under torchrun, makes sure every process ends with the same weights and buffers."""
    if not dist.is_initialized():
        return
    flat = torch.cat([t.detach().double().flatten() for t in task.state_dict().values() if t.is_floating_point()])
    position = torch.linspace(0, 1, len(flat), device=flat.device)
    summary = torch.stack([flat.sum(), flat.square().sum(), (flat * position).sum()])
    low, high = summary.clone(), summary.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the processes ended with different weights; please report this as a bug")
    log(f"weights and buffers identical on all {dist.get_world_size()} processes")


class Interrupted(Exception):
    """Raised between two steps after SIGINT or SIGTERM."""


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `signum`; the loop stops at the next step. A
    second signal gets the previous handler (Ctrl-C twice still kills at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def exit_on_signal(signum, epoch, last_path):
    """Says what was kept and how to resume, then exits with 128 + the signal number."""
    signum = signum or signal.SIGTERM  # another process may have been the one signalled
    name = signal.Signals(signum).name
    if epoch == 1:
        log(f"{name} in epoch 1: no epoch completed, nothing to resume.", file=sys.stderr)
    else:
        log(f"{name} in epoch {epoch}: {last_path} holds epoch {epoch - 1}; resume with:\n"
            f"  {resume_command(last_path)}", file=sys.stderr)
    sys.exit(128 + signum)


def resume_command(path):
    """The command line that resumes this run from `path`, for messages."""
    argv, skip = [], False
    for arg in sys.argv:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            argv.append(arg)
    return " ".join(shlex.quote(a) for a in ["python", *argv, "--resume", path])
