"""What the loss is: the task loss, plus a teacher term in codistill and distill modes.

codistill: L = task(y, z) + alpha * T^2 * CE(mean_j softmax(v_j / T), softmax(z / T)), alpha = 0
           during burn-in (Anil et al. 2018); the label-smoothing control swaps the peers' average
           for a smoothed one-hot target of the same weight.
distill:   L = (1 - a) * task(y, z) + a * T^2 * CE(mean softmax(v / T), softmax(z / T)) (Hinton et
           al. 2015), or squared error between logits.
"""

from __future__ import annotations

import torch

from hpcdistill import losses
from hpcdistill.teachers import forward as teachers_forward


def precision(settings, device: torch.device):
    """HPCDISTILL_PRECISION: bfloat16 autocast for forward passes (bf16 runs on CPUs too, slower or
    faster depending on the CPU's instructions), or nothing for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")


class Objective:
    """`objective(model, x, y, step)` -> (loss, parts). The parts are detached 0-d tensors (and counts):
    the loop turns them into numbers at log steps only, so a GPU step has no host synchronisation."""

    KINDS = ("task", "codistill", "label-smoothing", "distill")

    def __init__(self, settings, num_classes: int, teachers=None, *, kind: str = "task"):
        if kind not in self.KINDS:
            raise ValueError(f"objective kind {kind!r} is not one of {self.KINDS}")
        self.s, self.num_classes, self.teachers, self.kind = settings, num_classes, teachers, kind

    def alpha(self, step: int) -> float:
        if self.kind in ("codistill", "label-smoothing") and step < self.s.burn_in:
            return 0.0
        return self.s.distill_weight

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        with precision(self.s, x.device):
            z = model(x).float()  # the losses (and the distillation softmax) in fp32
        T, a = self.s.temperature, self.alpha(step)
        if self.kind == "task":
            loss = losses.task_loss(z, y, self.s.task_label_smoothing)
            return loss, {"loss": loss.detach()}
        if self.kind == "distill":
            with precision(self.s, x.device):
                v = [t.float() for t in self.teachers.logits(x)]
            if self.s.distill_loss == "logits":
                task = losses.task_loss(z, y) if a < 1 else z.new_zeros(())
                soft = losses.logit_matching_loss(z, v)
                loss = (1 - a) * task + a * soft
            else:
                loss = losses.hinton_loss(z, y if a < 1 else None, v, temperature=T, alpha=a)
            return loss, {"loss": loss.detach()}
        if self.kind == "label-smoothing":
            task = losses.task_loss(z, y)
            target = losses.smoothed_labels(y, self.num_classes, self.s.label_smoothing)
            distill = losses.distillation_loss(z, target, T) if a > 0 else z.new_zeros(())
            loss = task + a * distill
            return loss, {"loss": loss.detach(), "task_loss": task.detach(), "distill_loss": distill.detach()}
        with precision(self.s, x.device):
            peers = teachers_forward(self.teachers.teachers_for(step), x) if a > 0 else []
        peers = [v.float() for v in peers]
        loss, task, distill = losses.codistill_loss(z, y, peers, temperature=T, alpha=a)
        return loss, {"loss": loss.detach(), "task_loss": task.detach(), "distill_loss": distill.detach(),
                      "teachers": len(peers)}
