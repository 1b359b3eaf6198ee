"""The learning-rate schedule of LoLA-SpecViT's released trainer, per iteration (``enhanced_training.py`` of the
official code, FadiZidiDz/LoLA-SpecViT-Model).

(A) What ``enhanced_training.py`` runs, which :class:`LoLASchedule` reproduces with its defaults:

- epoch-level linear warm-up: for epoch ``e < E_w`` every group's lr is ``η0·(e+1)/E_w``;
- then SGDR cosine warm restarts at the fractional epoch ``t = e + i/N`` of micro-batch ``i`` of ``N``:
  ``T0=10, T_mult=2`` → restarts at t = 10, 30, 70, …; ``η_g(t) = η_min + (η0_g − η_min)·½(1 + cos(π T_cur/T_i))``.

One deliberate difference: the release steps SGDR *after* micro-batch ``i`` with ``t = e + i/N``, so micro-batch
``i`` trains with the lr of ``t = e + (i−1)/N`` (and the first batch after warm-up still at ``η0``); here micro-batch
``i`` trains with the lr of its own ``t``. :func:`lr_at_epoch` is the formula itself.

Param groups (§6 A): ``{"name": "lora", lr η0}`` with every LoRA parameter and ``{"name": "other", lr 0.1·η0}``
with the rest (empty under the official freezing). ``lora_lr_scale`` λ is the unused ``EnhancedLoRACLRScheduler``'s
boost (§6 B): for groups whose name contains "lora" the cosine part is multiplied by λ. The default 1.0 is the
release; 2.0 is scheduler (B).

``cycle_lora_scale`` — an assumption, not the release: the paper says the cyclical schedule "modulates LoRA
adaptation strength", but no released code cycles the LoRA scale (the hook ``update_lora_scale`` is a no-op
there). With the option on, after warm-up every LoRA scale ``s = α/r`` is multiplied by
``g(c_t) = m + (1 − m)·c_t`` (``m = lora_scale_min``, default 0.5; ``c_t`` the cosine factor above), so the adapters'
strength follows the same restarts as the lr. The factor lives in a buffer of each LoRA layer and is saved with the
model, so evaluation uses the strength of the last training step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def cosine_factor(t: float, t0: float = 10.0, t_mult: int = 2) -> float:
    """SGDR's ``½(1 + cos(π T_cur / T_i))`` at fractional epoch ``t`` (PyTorch's CosineAnnealingWarmRestarts)."""
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}.")
    if t < t0:
        t_cur, t_i = t, t0
    elif t_mult == 1:
        t_cur, t_i = t % t0, t0
    else:
        n = int(math.log(t / t0 * (t_mult - 1) + 1, t_mult))
        start = lambda k: t0 * (t_mult ** k - 1) / (t_mult - 1)  # noqa: E731  (epoch where cycle k begins)
        while t >= start(n + 1):  # guard against log rounding at the restarts
            n += 1
        while n > 0 and t < start(n):
            n -= 1
        t_cur, t_i = t - t0 * (t_mult ** n - 1) / (t_mult - 1), t0 * t_mult ** n
    return 0.5 * (1 + math.cos(math.pi * t_cur / t_i))


def lr_at_epoch(t: float, eta0: float = 2e-5, eta_min: float = 1e-6, t0: float = 10.0, t_mult: int = 2) -> float:
    """``η_min + (η0 − η_min)·cosine_factor(t)``: the release's lr at fractional epoch ``t`` after warm-up."""
    return eta_min + (eta0 - eta_min) * cosine_factor(t, t0, t_mult)


def lola_param_groups(model: torch.nn.Module, lr: float, weight_decay: float = 0.01,
                      other_lr_ratio: float = 0.1) -> list[dict]:
    """The release's two groups: trainable parameters named ``*lora_*`` at ``lr``, the others at ``0.1·lr``."""
    lora, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if "lora_" in name else other).append(p)
    groups = [{"name": "lora", "params": lora, "lr": lr, "weight_decay": weight_decay},
              {"name": "other", "params": other, "lr": lr * other_lr_ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


class LoLASchedule:
    """Warm-up + cosine warm restarts, set before every micro-batch; call :meth:`step` after each one."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, warmup_epochs: int = 5,
                 t0: float = 10.0, t_mult: int = 2, eta_min: float = 1e-6, lora_lr_scale: float = 1.0,
                 model: Optional[torch.nn.Module] = None, cycle_lora_scale: bool = False,
                 lora_scale_min: float = 0.5) -> None:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1.")
        if cycle_lora_scale and model is None:
            raise ValueError("cycle_lora_scale needs the model (its LoRA layers' scales are cycled).")
        self.optimizer, self.steps_per_epoch, self.warmup_epochs = optimizer, steps_per_epoch, warmup_epochs
        self.t0, self.t_mult, self.eta_min, self.lora_lr_scale = t0, t_mult, eta_min, lora_lr_scale
        self.model, self.cycle_lora_scale, self.lora_scale_min = model, cycle_lora_scale, lora_scale_min
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.peak_lr = max(self.base_lrs)
        self.iteration = 0
        self._apply()

    def epoch_position(self, iteration: int) -> float:
        e, i = divmod(iteration, self.steps_per_epoch)
        return e + i / self.steps_per_epoch

    def lrs_at(self, iteration: int) -> list[float]:
        """Every group's lr for micro-batch ``iteration`` (0-based)."""
        epoch = iteration // self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return [self.peak_lr * (epoch + 1) / self.warmup_epochs for _ in self.base_lrs]
        c = cosine_factor(self.epoch_position(iteration), self.t0, self.t_mult)
        lrs = []
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            boost = self.lora_lr_scale if "lora" in str(group.get("name", "")) else 1.0
            lrs.append(self.eta_min + (base - self.eta_min) * c * boost)
        return lrs

    def lora_factor_at(self, iteration: int) -> float:
        """The ``cycle_lora_scale`` multiplier of s = α/r (1 during warm-up and when the option is off)."""
        if not self.cycle_lora_scale or iteration // self.steps_per_epoch < self.warmup_epochs:
            return 1.0
        c = cosine_factor(self.epoch_position(iteration), self.t0, self.t_mult)
        return self.lora_scale_min + (1 - self.lora_scale_min) * c

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(self.iteration)):
            group["lr"] = lr
        if self.cycle_lora_scale:
            self.model.update_lora_scale(self.lora_factor_at(self.iteration))

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()
