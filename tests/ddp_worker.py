"""Run by tests/test_distributed.py under torchrun (gloo, CPU): one process's view of the first
training step, of an evaluation and of CRD's training, saved by rank 0 for the test to compare with
one process."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DATASETS, DeviceLoader  # noqa: E402
from engine import Distiller, Supervised, Teacher, evaluate, train_step  # noqa: E402
from engine.checkpoint import generator_states, restore_generators  # noqa: E402
from engine.processes import check_replicas, over_processes, wrap_for_processes  # noqa: E402
from kd_losses import build_method  # noqa: E402
from models import build_model  # noqa: E402
from engine import setup_device  # noqa: E402


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def first_step(rank, world_size):
    """Gradient of the first step, model in eval mode (BN on running statistics), DDP-averaged."""
    spec = DATASETS["cifar10"]
    images, labels = synthetic(64, 0)
    loader = DeviceLoader(images, labels, 16, spec.mean, spec.std, train=True, seed=3, rank=rank,
                          world_size=world_size)
    x, y, indices, views, _ = next(iter(loader))
    torch.manual_seed(0)
    task = Supervised(build_model("resnet8", 10)).eval()
    if world_size > 1:
        task = torch.nn.parallel.DistributedDataParallel(task)
    _, terms = task(x, y, indices, views)
    terms["ce"].backward()
    return {"grads": {k: p.grad for k, p in task.named_parameters()}, "labels": y, "images": x}


def evaluation(rank, world_size):
    """Accuracy over a 41-image test set split unevenly across the processes."""
    spec = DATASETS["cifar10"]
    images, labels = synthetic(41, 1)
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    loader = DeviceLoader(images, labels, 8, spec.mean, spec.std, train=False, rank=rank, world_size=world_size)
    return evaluate(model, loader)


def crd(rank, world_size):
    """CRD trained for three steps (global batches of 16; eval mode, so that BN treats every image
    alone), then a fresh CRD's first forward on a global batch of 7 (split 3 + 4 over two processes,
    its Z not yet estimated). Per step the global batch's mean loss and KD term; the trained task's
    and the fresh method's weights, banks and Z (checked identical on every process)."""
    spec = DATASETS["cifar10"]
    images, labels = synthetic(48, 4)
    loader = DeviceLoader(images, labels, 16, spec.mean, spec.std, train=True, seed=3, rank=rank,
                          world_size=world_size)
    hparams = {"crd_feat_dim": 16, "crd_negatives": 20, "crd_T": 0.07, "crd_momentum": 0.5}
    torch.manual_seed(1)
    teacher = Teacher(build_model("resnet8", 10))
    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    method = build_method("crd", hparams, student, teacher, labels)
    loader.add_negatives(method.negatives_per_sample)
    task = Distiller(student, teacher, method, ce_weight=1.0, kd_weight=0.8).eval()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    trainer = wrap_for_processes(task, torch.device("cpu"), sync_bn=False)
    losses = []
    for batch in loader:
        _, loss, terms = train_step(trainer, optimizer, batch)
        # each process's mean over its slice, weighted by its size: the global batch's mean
        sums = over_processes(torch.stack([loss.detach(), terms["kd"].detach(), torch.tensor(1.0)]) * len(batch[1]))
        losses.append(sums[:2] / sums[2])
    check_replicas(task)

    torch.manual_seed(2)
    fresh = build_method("crd", hparams, student, teacher, labels)
    pool_s, pool_t = torch.randn(7, 64), torch.randn(7, 64)
    indices = torch.cat([torch.randperm(48)[:7, None], torch.randint(0, 48, (7, 20))], 1)
    lo, hi = 7 * rank // world_size, 7 * (rank + 1) // world_size
    with torch.no_grad():
        loss = fresh({"pool": pool_s[lo:hi]}, {"pool": pool_t[lo:hi]}, None, indices[lo:hi])
    check_replicas(fresh)
    return {"losses": torch.stack(losses), "trained": task.state_dict(), "fresh": fresh.state_dict(),
            "fresh_loss": over_processes(loss * (hi - lo)) / 7}


def generators(rank, world_size):
    """Each process's generators after it drew a different amount; as only rank 0 writes last.pt,
    every process restores from rank 0's copy of the states. Returns whether every process then
    draws what it would have drawn uninterrupted, and what each drew."""
    spec = DATASETS["cifar10"]
    images, labels = synthetic(64, 2)
    loader = DeviceLoader(images, labels, 16, spec.mean, spec.std, train=True, seed=3, rank=rank,
                          world_size=world_size)
    torch.manual_seed(0)
    torch.rand(rank + 1)  # the processes' global generators now differ
    states = generator_states(loader)
    expected = torch.rand(4)
    shared = [states]
    dist.broadcast_object_list(shared, src=0)  # the states as last.pt holds them: rank 0's copy
    torch.manual_seed(123)
    restore_generators(shared[0], loader)
    same = torch.tensor(int(torch.equal(torch.rand(4), expected)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    drawn = [torch.empty_like(expected) for _ in range(world_size)]
    dist.all_gather(drawn, expected)
    return {"same_on_every_process": bool(same), "drawn": torch.stack(drawn), "saved": len(states["processes"])}


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    _, rank, world_size = setup_device("cpu")
    result = {"first_step": first_step, "evaluation": evaluation, "generators": generators,
              "crd": crd}[what](rank, world_size)
    if what == "first_step" and world_size > 1:  # the processes' batches, to check they form the global one
        gathered = [torch.empty_like(result["labels"]) for _ in range(world_size)]
        dist.all_gather(gathered, result["labels"])
        result["labels"] = torch.cat(gathered)
    if rank == 0:
        torch.save(result, out)
    if dist.is_initialized():
        dist.destroy_process_group()
