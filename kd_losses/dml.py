import torch.nn.functional as F

import models

from .base import KDMethod, register


def kl(target_logits, logits):
    """KL(softmax(target) || softmax(logits)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.softmax(target_logits.float(), dim=1),
                    reduction="batchmean")


@register("dml")
class DeepMutualLearning(KDMethod):
    """Two networks trained together from one forward each on the same images, each distilling
    from the other (no temperature): the student's term is KL(p_peer || p_student) with the peer
    detached; the peer's term is CE(peer, targets) + KL(p_student || p_peer) with the student
    detached. The peer has the teacher checkpoint's architecture but starts from scratch (the
    teacher's weights are not read, nor are its outputs computed). It is a submodule, so the one
    optimizer trains it, checkpoints hold it and DDP wraps it.

    The trainer multiplies every term by the KD weight, so the peer's own cross-entropy is inside
    the 'peer' term and scales with --kd-weight too (at the default 1 both networks get CE + KL,
    the seed zoo's synchronous update); --ce-weight reaches only the student's CE."""

    paper = "Zhang et al. 2018, Deep Mutual Learning"
    summary = ("a peer network with the teacher checkpoint's architecture, trained from scratch beside the "
               "student: KL(peer ‖ student) for the student, CE + KL(student ‖ peer) for the peer")
    weight_source = "seed zoo"
    deviations = ("synchronous updates from one forward of each (seed zoo), not the paper's alternating ones; the "
                  "teacher's weights are not used; `--kd-weight` scales the peer's whole loss")
    reads_teacher = False

    def attach(self, student, teacher, train_labels):
        peer = models.build_model(teacher.arch, teacher.num_classes, teacher.shortcut)
        self.peer = peer.to(next(student.parameters()).device).train(self.training)

    def step(self, student, images, targets, indices, teacher_out):
        logits = student(images)
        return logits, self({"logits": logits}, {"logits": self.peer(images)}, targets)

    def forward(self, student, peer, targets):
        s, p = student["logits"], peer["logits"]
        return {"kl": kl(p.detach(), s),
                "peer": F.cross_entropy(p.float(), targets) + kl(s.detach(), p)}
