"""The stage that AB and FSP run before training: the student learns from the teacher's features
alone, with no labels, before training proper goes on with cross-entropy only."""
import torch

from utils import progress_bar


def stage_lr(lr, epoch, epochs):
    """lr, then lr / 10 after 60 % of the epochs and lr / 100 after 80 %: the seed zoo's 30, 10 and
    10 epochs at 0.01, 0.001 and 0.0001 when epochs = 50 and lr = 0.01."""
    return lr * 0.1 ** ((epoch > 0.6 * epochs) + (epoch > 0.8 * epochs))


def train_student_alone(method, student, teacher_outputs, batches, epochs, lr, loss_weight):
    """Trains the student and the method's learnable parts (connectors) on loss_weight x the
    method's loss, for `epochs` passes over `batches`, with SGD (momentum 0.9, Nesterov, weight
    decay 1e-4: the seed zoo's settings, whose stage reuses the training optimizer).

    teacher_outputs(images) -> the frozen teacher's logits and the method's features;
    batches yields (images, targets, indices)."""
    student.train()
    method.train()
    parameters = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = stage_lr(lr, epoch, epochs)
        total, seen = 0.0, 0
        for images, targets, _ in progress_bar(batches, f"{method.name} stage {epoch}/{epochs}"):
            teacher = teacher_outputs(images)
            logits, feats = student(images, features=True)
            outputs = {"logits": logits, **{k: feats[k] for k in method.features}}
            loss = loss_weight * method(outputs, teacher, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.detach() * len(images), seen + len(images)
        if epoch == 1 or epoch == epochs or epoch % 10 == 0:
            print(f"{method.name} stage epoch {epoch}/{epochs}: weighted {method.name} loss "
                  f"{float(total) / seen:.5f}", flush=True)
