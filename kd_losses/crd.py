import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .base import KDMethod, as_float, register


def memory_scores(anchors, memory, indices):
    """anchors[n] . memory[indices[n, j]] for every n, j: N x (1 + K), in float32 even under autocast.

    One N x (set size) product and a gather, rather than gathering N x (1 + K) memory rows: the same
    dot products at a small fraction of the memory. The bank is cloned because the product keeps
    its operand for the backward pass and the bank is updated in place before that runs."""
    with torch.autocast(anchors.device.type, enabled=False):
        return (anchors.float() @ memory.clone().t()).gather(1, indices)


def gather_rows(tensor, sizes):
    """Every process's `tensor` (first dimension sizes[rank]) concatenated in rank order. gloo gathers
    equal shapes only, and the local batches differ by a row where the global batch does not split
    evenly, so each is padded to the largest and cut back after."""
    padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
    padded[:len(tensor)] = tensor
    gathered = tensor.new_empty(len(sizes) * max(sizes), *tensor.shape[1:])
    dist.all_gather_into_tensor(gathered, padded)
    return torch.cat([part[:n] for part, n in zip(gathered.chunk(len(sizes)), sizes)])


def global_batch(own, embeddings, log_sum):
    """Under torchrun, from each process's slice of the global batch: the whole batch's own indices
    and embeddings, in the single-process order (data.DeviceLoader gives the processes contiguous
    slices in rank order), the log-sum-exp of its scores per term (log_sum: the local one) and its size."""
    local = torch.cat([log_sum.double(), log_sum.new_tensor([len(own)], dtype=torch.float64)])
    every = local.new_empty(dist.get_world_size() * len(local))
    dist.all_gather_into_tensor(every, local)
    every = every.view(-1, len(local))
    sizes = every[:, -1].long().tolist()  # on the host (a synchronisation): the gathers' shapes
    log_sum = every[:, :-1].logsumexp(0).to(log_sum.dtype)
    return gather_rows(own, sizes), gather_rows(embeddings, sizes), log_sum, sum(sizes)


@register("crd")
class ContrastiveRepresentationDistillation(KDMethod):
    """NCE loss between embeddings of the pooled vectors and two memory banks of the training set.

    Each side's pooled vector goes through a linear layer to crd_feat_dim and is L2-normalised.
    Each bank holds one row per training sample (uniform in +-sqrt(3 / dim) at first): the
    student-side bank the student's past embeddings, the teacher-side bank the teacher's. For an
    anchor embedding a and a bank M, the score of sample i is P_i = exp(a . M_i / T) / Z; with K
    negatives of other classes and noise probability 1/N (N the training set size), the loss is
    -[log(P_own / (P_own + K/N)) + sum over the negatives of log((K/N) / (P_neg + K/N))] averaged
    over the batch. The student-anchor term scores the student's embedding against the
    teacher-side bank, the teacher-anchor term the teacher's embedding against the student-side
    bank; the loss is their sum. Z, one per term, is estimated from the first batch as N times the
    mean of exp(a . M_i / T) over its scores, then kept fixed (buffers, so checkpointed). After the
    loss is computed, each bank's rows of the batch's own samples become
    normalise(momentum * row + (1 - momentum) * embedding), outside the autograd graph.

    Under torchrun every process holds both banks whole: the processes gather each other's
    indices and embeddings (without gradients), and each updates its banks, and estimates Z, from
    the whole global batch, so that the banks stay identical on all processes and equal a single
    process's. The loss itself is each process's mean over its own slice (see forward).

    The loader supplies the indices: column 0 the sample itself, columns 1..K other-class samples
    (RepDistiller's 'exact' mode). The banks are sized in attach() from the training labels."""

    paper = "Tian et al. 2020, Contrastive Representation Distillation"
    summary = ("NCE between 128-d embeddings of the pooled vectors and two momentum memory banks over the "
               "training set, 16,384 other-class negatives per sample (supplied by the data loader)")
    weight_source = "seed zoo for CIFAR-10, RepDistiller for CIFAR-100"
    deviations = ("the code's Z estimate (the paper's critic has none) and both anchor directions summed; T 0.07 "
                  "(RepDistiller; the seed zoo 0.1)")
    features = ("pool",)
    default_weight = {"cifar10": 0.2, "cifar100": 0.8}
    hyperparameters = {"crd_feat_dim": (128, "dimension of the embedding space"),
                       "crd_negatives": (16384, "negatives (samples of other classes) per sample"),
                       "crd_T": (0.07, "NCE temperature (RepDistiller's; the seed zoo uses 0.1)"),
                       "crd_momentum": (0.5, "momentum of the memory bank update, below 1")}

    def __init__(self, student_shapes, teacher_shapes, crd_feat_dim, crd_negatives, crd_T, crd_momentum):
        super().__init__(student_shapes, teacher_shapes)
        if crd_momentum >= 1:
            raise ValueError(f"crd_momentum must be below 1 (1 would never update the memory), got {crd_momentum}")
        self.feat_dim, self.T, self.momentum = crd_feat_dim, crd_T, crd_momentum
        self.negatives_per_sample = crd_negatives
        self.embed_student = nn.Linear(student_shapes["pool"][0], crd_feat_dim)
        self.embed_teacher = nn.Linear(teacher_shapes["pool"][0], crd_feat_dim)

    def attach(self, student, teacher, train_labels):
        size, device = len(train_labels), train_labels.device
        bound = math.sqrt(3 / self.feat_dim)  # rows of norm about 1, as RepDistiller initialises them
        for name in ("student_memory", "teacher_memory"):
            self.register_buffer(name, (2 * torch.rand(size, self.feat_dim, device=device) - 1) * bound)
        # log Z of the student-anchor and the teacher-anchor term, valid once z_estimated is set
        self.register_buffer("log_z", torch.zeros(2, device=device))
        self.register_buffer("z_estimated", torch.tensor(False, device=device))

    def step(self, student, images, targets, indices, teacher_out):
        logits, feats = student(images, features=True)
        with torch.autocast(images.device.type, enabled=False):  # embeddings and loss in fp32, as every loss
            loss = self(as_float({"pool": feats["pool"]}), as_float(teacher_out), targets, indices)
        return logits, loss

    def forward(self, student, teacher, targets, indices):
        """indices: N x (1 + K) positions in the training set, column 0 each sample's own."""
        emb_s = F.normalize(self.embed_student(student["pool"]).float(), dim=1)
        emb_t = F.normalize(self.embed_teacher(teacher["pool"]).float(), dim=1)
        logits = torch.stack([memory_scores(emb_s, self.teacher_memory, indices),
                              memory_scores(emb_t, self.student_memory, indices)]) / self.T  # 2 x N x (1 + K)
        size = len(self.student_memory)
        with torch.no_grad():
            own, embeddings, batch = indices[:, 0], torch.cat([emb_s, emb_t], 1), len(indices)
            log_sum = logits.flatten(1).logsumexp(1)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                own, embeddings, log_sum, batch = global_batch(own, embeddings, log_sum)
            # a branch-free "estimate once": no host synchronisation at any step in a single process
            first_estimate = log_sum - math.log(batch * indices.shape[1]) + math.log(size)
            self.log_z.copy_(torch.where(self.z_estimated, self.log_z, first_estimate))
            self.z_estimated.fill_(True)
        log_p = logits - self.log_z[:, None, None]
        log_noise = math.log((indices.shape[1] - 1) / size)  # log(K / N): K negatives, each of probability 1/N
        # log(P / (P + c)) = logsigmoid(log P - log c), log(c / (P + c)) = logsigmoid(log c - log P)
        positive = F.logsigmoid(log_p[:, :, 0] - log_noise).sum()
        negative = F.logsigmoid(log_noise - log_p[:, :, 1:]).sum()
        # the mean over this process's samples: with equal slices, DDP's average of the processes'
        # gradients is the gradient of the mean over the global batch
        loss = -(positive + negative) / len(indices)
        self._update_memory(self.student_memory, own, embeddings[:, :self.feat_dim])
        self._update_memory(self.teacher_memory, own, embeddings[:, self.feat_dim:])
        return loss

    @torch.no_grad()
    def _update_memory(self, memory, own, embeddings):
        rows = self.momentum * memory[own] + (1 - self.momentum) * embeddings.detach()
        memory.index_copy_(0, own, F.normalize(rows, dim=1))
