"""CRD and DML: golden values recomputed in float64 numpy with explicit loops (never through
kd_losses' own helpers), CRD's memory bank and normalisation constants, DML's peer network."""
import math

import numpy as np
import pytest
import torch

from kd_losses import feature_shapes
from kd_losses.crd import ContrastiveRepresentationDistillation as CRD
from kd_losses.dml import DeepMutualLearning as DML
from models import build_model
from models.resnet import CifarResNet

# a tiny CRD: 12 training samples of 3 classes, 5 negatives, 4-dimensional embeddings
SIZE, NEGATIVES, DIM, BATCH = 12, 5, 4, 3
LABELS = torch.arange(SIZE) % 3
OWN = [7, 2, 10]
# a student narrower than the teacher: the two embeddings have different input widths
S_SHAPES, T_SHAPES = {"pool": (6,)}, {"pool": (8,)}


def as64(tensor):
    return tensor.detach().double().numpy()


def close(got, expected):
    return got.detach().item() == pytest.approx(float(expected), rel=1e-5, abs=1e-8)


def crd(T=0.07, momentum=0.5, feat_dim=DIM, negatives=NEGATIVES, s_shapes=S_SHAPES, t_shapes=T_SHAPES):
    torch.manual_seed(0)
    method = CRD(s_shapes, t_shapes, crd_feat_dim=feat_dim, crd_negatives=negatives, crd_T=T,
                 crd_momentum=momentum)
    method.attach(None, None, LABELS)
    return method


def crd_batch(seed):
    """Pooled vectors of both sides and indices: each sample's own, then NEGATIVES of other classes."""
    g = torch.Generator().manual_seed(seed)
    student = {"pool": torch.randn(BATCH, *S_SHAPES["pool"], generator=g)}
    teacher = {"pool": torch.randn(BATCH, *T_SHAPES["pool"], generator=g)}
    rows = []
    for own in OWN:
        others = [i for i in range(SIZE) if LABELS[i] != LABELS[own]]
        rows.append([own] + [others[j] for j in torch.randint(len(others), (NEGATIVES,), generator=g)])
    return student, teacher, torch.tensor(rows)


def embedding(linear, x):
    """numpy: W x + b, divided by its L2 norm, one row per sample."""
    w, b = as64(linear.weight), as64(linear.bias)
    out = []
    for v in as64(x):
        e = w @ v + b
        out.append(e / math.sqrt((e ** 2).sum()))
    return np.array(out)


def nce(anchors, memory, indices, z, T):
    """RepDistiller's contrast loss with P = exp(a . m / T) / Z and noise K / N, averaged over the batch."""
    noise = NEGATIVES / SIZE
    total = 0.0
    for n, row in enumerate(indices.tolist()):
        for j, i in enumerate(row):
            p = math.exp(np.dot(anchors[n], memory[i]) / T) / z
            total -= math.log(p / (p + noise)) if j == 0 else math.log(noise / (p + noise))
    return total / len(indices)


def estimated_z(anchors, memory, indices, T):
    """N times the mean of exp(a . m / T) over the batch's scores."""
    values = [math.exp(np.dot(anchors[n], memory[i]) / T) for n, row in enumerate(indices.tolist()) for i in row]
    return SIZE * sum(values) / len(values)


# ------------------------------------------------------------------------------------------- CRD

@pytest.mark.parametrize("T", [0.07, 0.5])
def test_crd_golden(T):
    method = crd(T=T)
    z_student_anchor, z_teacher_anchor = 40.0, 25.0
    method.log_z.copy_(torch.tensor([math.log(z_student_anchor), math.log(z_teacher_anchor)]))
    method.z_estimated.fill_(True)
    student, teacher, indices = crd_batch(1)
    e_s, e_t = embedding(method.embed_student, student["pool"]), embedding(method.embed_teacher, teacher["pool"])
    # the loss must come from the memory as it was before this batch's update
    m_s, m_t = as64(method.student_memory), as64(method.teacher_memory)
    expected = (nce(e_s, m_t, indices, z_student_anchor, T)      # student anchor, teacher-side bank
                + nce(e_t, m_s, indices, z_teacher_anchor, T))   # teacher anchor, student-side bank
    assert close(method(student, teacher, None, indices), expected)


def test_crd_memory_update_on_own_rows_only():
    method = crd(momentum=0.3)  # not 0.5, so that momentum and 1 - momentum cannot be swapped
    student, teacher, indices = crd_batch(2)
    e_s, e_t = embedding(method.embed_student, student["pool"]), embedding(method.embed_teacher, teacher["pool"])
    old_s, old_t = as64(method.student_memory), as64(method.teacher_memory)
    method(student, teacher, None, indices)
    for memory, old, emb in ((method.student_memory, old_s, e_s), (method.teacher_memory, old_t, e_t)):
        expected = old.copy()
        for n, own in enumerate(OWN):
            row = 0.3 * old[own] + 0.7 * emb[n]
            expected[own] = row / math.sqrt((row ** 2).sum())
        np.testing.assert_allclose(as64(memory), expected, rtol=1e-5, atol=1e-7)
        untouched = [i for i in range(SIZE) if i not in OWN]  # negatives of the batch included
        assert np.array_equal(as64(memory)[untouched], old[untouched])


def test_crd_memory_init():
    torch.manual_seed(0)
    method = CRD(S_SHAPES, T_SHAPES, crd_feat_dim=128, crd_negatives=5, crd_T=0.07, crd_momentum=0.5)
    method.attach(None, None, torch.arange(2000) % 10)
    bound = math.sqrt(3 / 128)  # RepDistiller: uniform in +-1 / sqrt(dim / 3)
    for name in ("student_memory", "teacher_memory"):
        memory = getattr(method, name)
        assert memory.shape == (2000, 128) and memory.dtype == torch.float32
        assert memory.abs().max() <= bound and memory.abs().max() > 0.999 * bound
        assert memory.abs().mean().item() == pytest.approx(bound / 2, rel=0.01)  # uniform, not normal
        assert name in method.state_dict()
    assert not torch.equal(method.student_memory, method.teacher_memory)


def test_crd_z_estimated_once_then_fixed_and_checkpointed():
    T = 0.07
    method = crd(T=T)
    student, teacher, indices = crd_batch(3)
    e_s, e_t = embedding(method.embed_student, student["pool"]), embedding(method.embed_teacher, teacher["pool"])
    m_s, m_t = as64(method.student_memory), as64(method.teacher_memory)
    z_s, z_t = estimated_z(e_s, m_t, indices, T), estimated_z(e_t, m_s, indices, T)
    loss = method(student, teacher, None, indices)
    np.testing.assert_allclose(as64(method.log_z), [math.log(z_s), math.log(z_t)], rtol=1e-6)
    assert close(loss, nce(e_s, m_t, indices, z_s, T) + nce(e_t, m_s, indices, z_t, T))

    estimated = method.log_z.clone()
    student, teacher, indices = crd_batch(4)
    method(student, teacher, None, indices)  # another batch, another memory: Z stays
    assert torch.equal(method.log_z, estimated)

    resumed = crd(T=T)  # a resumed run restores Z with the checkpoint and does not estimate it again
    resumed.load_state_dict(method.state_dict())
    student, teacher, indices = crd_batch(5)
    resumed(student, teacher, None, indices)
    assert torch.equal(resumed.log_z, estimated)


def test_crd_gradients_reach_student_and_embeddings_not_memory():
    student = CifarResNet(8, 10, widths=(8, 16, 32)).train()  # pool 32 against the teacher's 64
    teacher = build_model("resnet8", 10).eval()
    method = CRD(feature_shapes(student), feature_shapes(teacher), crd_feat_dim=DIM, crd_negatives=NEGATIVES,
                 crd_T=0.07, crd_momentum=0.5)
    method.attach(student, teacher, LABELS)
    images = torch.randn(BATCH, 3, 16, 16)  # small images: the pooled width is the same
    _, _, indices = crd_batch(6)
    with torch.inference_mode():
        logits_t, feats_t = teacher(images, features=True)
    teacher_outputs = {"logits": logits_t.clone(), "pool": feats_t["pool"].clone()}
    memory_before = method.student_memory.clone()

    logits, loss = method.step(student, images, LABELS[OWN], indices, teacher_outputs)
    assert logits.shape == (BATCH, 10) and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()  # after the in-place memory update: the graph must not depend on the bank
    # CRD reads the pooled vector, so everything up to it learns (the classifier learns from CE)
    trained = [p for name, p in student.named_parameters() if not name.startswith("fc.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained + list(method.parameters()))
    for memory in (method.student_memory, method.teacher_memory):
        assert not memory.requires_grad and memory.grad is None
    assert not torch.equal(method.student_memory, memory_before)


def test_crd_defaults():
    assert {k: v for k, (v, _) in CRD.hyperparameters.items()} == {
        "crd_feat_dim": 128, "crd_negatives": 16384, "crd_T": 0.07, "crd_momentum": 0.5}
    assert CRD.default_weight == {"cifar10": 0.2, "cifar100": 0.8}
    assert CRD.features == ("pool",)
    method = CRD(S_SHAPES, T_SHAPES, crd_feat_dim=128, crd_negatives=16384, crd_T=0.07, crd_momentum=0.5)
    assert method.negatives_per_sample == 16384


# ------------------------------------------------------------------------------------------- DML

def model(name, classes=10, shortcut="projection"):
    net = build_model(name, classes, shortcut)
    # the lead is adding these attributes to every model; set them where they are not there yet
    for key, value in (("arch", name), ("num_classes", classes), ("shortcut", shortcut)):
        if not hasattr(net, key):
            setattr(net, key, value)
    return net


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_dml_golden_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(5, 10, generator=g)).requires_grad_()
    p = (3 * torch.randn(5, 10, generator=g)).requires_grad_()
    targets = torch.tensor([0, 3, 9, 3, 1])
    terms = DML({}, {})({"logits": s}, {"logits": p}, targets)
    assert set(terms) == {"kl", "peer"}

    z_s, z_p = as64(s), as64(p)
    kl_student = kl_peer = ce_peer = 0.0
    grad_s, grad_p = np.zeros_like(z_s), np.zeros_like(z_p)
    for n in range(5):
        q_s, q_p = softmax(z_s[n]), softmax(z_p[n])
        kl_student += sum(q_p[c] * (math.log(q_p[c]) - math.log(q_s[c])) for c in range(10))
        kl_peer += sum(q_s[c] * (math.log(q_s[c]) - math.log(q_p[c])) for c in range(10))
        ce_peer -= math.log(q_p[targets[n]])
        # each network's gradient comes from its own terms only (the other side is detached)
        grad_s[n] = q_s - q_p
        grad_p[n] = (q_p - np.eye(10)[targets[n]]) + (q_p - q_s)
    assert close(terms["kl"], kl_student / 5)
    assert close(terms["peer"], (ce_peer + kl_peer) / 5)
    (terms["kl"] + terms["peer"]).backward()
    np.testing.assert_allclose(as64(s.grad), grad_s / 5, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(as64(p.grad), grad_p / 5, rtol=1e-5, atol=1e-7)


def test_dml_peer_has_teacher_architecture_fresh_weights():
    torch.manual_seed(0)
    student, teacher = model("resnet8"), model("resnet14", shortcut="identity")
    method = DML(feature_shapes(student), feature_shapes(teacher))
    method.attach(student, teacher, LABELS)
    assert DML.reads_teacher is False and DML.default_weight == 1.0
    peer_state, teacher_state = method.peer.state_dict(), teacher.state_dict()
    assert {k: v.shape for k, v in peer_state.items()} == {k: v.shape for k, v in teacher_state.items()}
    assert not torch.equal(peer_state["fc.weight"], teacher_state["fc.weight"])  # built fresh, not copied
    assert method.peer is not teacher and "peer.fc.weight" in method.state_dict()
    method.eval()
    assert not method.peer.training
    method.train()
    assert method.peer.training


def test_dml_one_optimizer_step_changes_student_and_peer():
    torch.manual_seed(0)
    student, teacher = model("resnet8"), model("resnet14")
    method = DML(feature_shapes(student), feature_shapes(teacher))
    method.attach(student, teacher, LABELS)
    student.train(), method.train()
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1)
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_p = {k: v.clone() for k, v in method.peer.state_dict().items()}
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, terms = method.step(student, images, targets, torch.arange(4), None)
    assert logits.shape == (4, 10)
    (torch.nn.functional.cross_entropy(logits, targets) + sum(terms.values())).backward()
    optimizer.step()
    for net, before in ((student, before_s), (method.peer, before_p)):
        assert not torch.equal(net.fc.weight, before["fc.weight"])
        assert not torch.equal(net.conv1.weight, before["conv1.weight"])


def test_crd_step_computes_embeddings_and_loss_in_fp32_under_autocast():
    """Under bf16 autocast the networks' outputs are bf16; CRD's step still runs its embedding heads,
    scores and memory update in fp32: the same as the fp32 forward on those outputs."""
    student, teacher, indices = crd_batch(3)
    student_bf16, teacher_bf16 = student["pool"].bfloat16(), {"pool": teacher["pool"].bfloat16()}

    def network(images, features=False):
        return torch.zeros(BATCH, 10, dtype=torch.bfloat16), {"pool": student_bf16}
    plain, mixed = crd(), crd()
    expected = plain({"pool": student_bf16.float()}, {"pool": teacher_bf16["pool"].float()}, None, indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = mixed.step(network, torch.zeros(BATCH, 3, 32, 32), None, indices, teacher_bf16)
    assert loss.dtype == torch.float32 and close(loss, expected.item())
    assert torch.equal(mixed.student_memory, plain.student_memory)
    assert torch.equal(mixed.teacher_memory, plain.teacher_memory)
