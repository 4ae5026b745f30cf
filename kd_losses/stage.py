"""The one stage loop: what FT (its paraphraser), AB and FSP (the student, from the teacher's
features alone, with no labels) train before training proper. train_kd.py runs a method's
train_stage() once, before the first epoch (engine.checkpoint.run_stage)."""
import torch

from utils import log, progress_bar


def stage_lr(lr, epoch, epochs):
    """lr, then lr / 10 after 60 % of the epochs and lr / 100 after 80 %: the seed zoo's 30, 10 and
    10 epochs at 0.01, 0.001 and 0.0001 when epochs = 50 and lr = 0.01."""
    return lr * 0.1 ** ((epoch > 0.6 * epochs) + (epoch > 0.8 * epochs))


def train_stage(name, parameters, batch_loss, batches, epochs, lr, amp=False, lr_steps=True, nesterov=True,
                what="loss"):
    """Minimises batch_loss(images) over `epochs` passes of `batches` (training
    batches: images first) with SGD: momentum 0.9, weight decay 1e-4, the LR constant or, with
    lr_steps, stepped by stage_lr; under bf16 autocast with amp, as training (batch_loss returns
    its loss in fp32). Prints the epoch's mean loss, named `what`, now and then."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=1e-4)
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = stage_lr(lr, epoch, epochs) if lr_steps else lr
        total, seen = 0.0, 0
        for images, *_ in progress_bar(batches, f"{name} stage {epoch}/{epochs}"):
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = batch_loss(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.detach() * len(images), seen + len(images)
        if epoch == 1 or epoch == epochs or epoch % 10 == 0:
            log(f"{name} stage epoch {epoch}/{epochs}: {what} {float(total) / seen:.5f}")


def train_student_alone(method, student, teacher, batches, epochs, lr, loss_weight):
    """AB's and FSP's stage: the student and the method's learnable parts (connectors) learn
    loss_weight x the method's loss from the teacher's features, with the seed zoo's settings
    (its stage reuses the training optimizer: Nesterov, weight decay 1e-4)."""
    student.train()
    method.train()
    # the stage trains the connectors even where training proper will not (a KD weight of 0 froze them)
    frozen = [p for p in method.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)

    def batch_loss(images):  # the training step's forward and fp32 loss, without labels
        _, loss = method.step(student, images, None, None, teacher.outputs(images, method.features))
        return loss_weight * loss
    parameters = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    train_stage(method.name, parameters, batch_loss, batches, epochs, lr, teacher.amp,
                what=f"weighted {method.name} loss")
    for p in frozen:
        p.requires_grad_(False)
