"""The pieces of BEiT pretraining that the trainer, the benchmarks and the GPU tests share.

The model, the optimizer (timm's factory, over our parameter groups) and its learning-rate
schedule, the MIM loss and the one training step (forward, loss, backward, clip, optimizer and
scheduler) live here, so that a benchmark measures exactly the step that ``beit-data pretrain``
runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.scheduler.scheduler import Scheduler

from beit_common import BeitDataError
from beit_model.beit_mim import masked_positions  # and registers the beit_mim_* variants
from pipelines.runtime import Precision, autocast

__all__ = ["IGNORE", "build_model", "param_groups", "lr_factor", "WarmupCosine", "Schedule", "check_optimizer",
           "build_optimizer", "build_scheduler", "mim_loss", "StepOutput", "train_step", "accumulated_step"]

IGNORE = -100  # target of the padding entries of the fixed-shape masked positions


def build_model(name: str, vocab_size: int, *, drop_path: float = 0.0, layer_scale: float = 0.1) -> torch.nn.Module:
    """A registered ``beit_mim_*`` or ``beitv2_mim_*`` variant with an LM head over ``vocab_size``
    visual tokens."""
    import timm

    if not name.startswith(("beit_mim_", "beitv2_mim_")):
        raise BeitDataError(f"model must be a beit_mim_* or beitv2_mim_* variant, got {name}")
    try:
        return timm.create_model(name, vocab_size=vocab_size, drop_path_rate=drop_path, init_values=layer_scale)
    except RuntimeError as exc:
        raise BeitDataError(f"unknown model {name}: {exc}") from None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms, LayerScale) and ``no_weight_decay()``."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warmup per step, then cosine decay to ``min_lr``, as a factor of ``lr``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))) / lr


class WarmupCosine(Scheduler):
    """BEiT's schedule (``sched`` cosine, the default): ``lr_factor`` of each step, as every run
    before timm's schedulers had it (a ``LambdaLR`` of it): a warmup from ``lr / warmup`` to
    ``lr`` at step ``warmup - 1``, then the cosine over the remaining steps from ``lr`` at step
    ``warmup`` to ``min_lr`` (unilm's ``cosine_scheduler``, but for its warmup from 0). timm's
    ``CosineLRScheduler`` warms up from ``warmup_lr``, and either counts its decay from step 0 or
    starts it a step after the warmup, so no setting of it gives these learning rates; this one
    keeps every step's bit for bit."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int, lr: float, min_lr: float):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.warmup, self.total, self.lr, self.min_lr = warmup, total, lr, min_lr

    def _get_lr(self, t: int) -> list[float]:
        return [base * lr_factor(t, self.warmup, self.total, self.lr, self.min_lr) for base in self.base_values]


class Schedule:
    """A timm scheduler (or none: ``sched`` none keeps ``lr``) stepped per optimizer step, as the
    training step calls torch's schedulers: ``step()`` after each, which sets the learning rate of
    the next. Its state is the number of steps taken: a schedule is a function of the settings,
    which a resumed run keeps (``check_resume``), so an extended run's schedule ends at its new
    total. A checkpoint from before timm's schedulers holds a ``LambdaLR``'s state, whose
    ``last_epoch`` is that count."""

    def __init__(self, scheduler: Scheduler | None):
        self.scheduler, self.steps = scheduler, 0
        self._update()

    def _update(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step_update(self.steps)

    def step(self) -> None:
        self.steps += 1
        self._update()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"] if "steps" in state else state["last_epoch"]
        self._update()


def check_optimizer(name: str) -> None:
    """Refuse an ``opt`` that timm's factory does not make, before a run starts.

    Raises:
        BeitDataError: Naming it, with the closest of timm's names.
    """
    import difflib

    import timm.optim

    try:
        timm.optim.create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=name, lr=1e-3)
    except (ValueError, TypeError, ImportError) as exc:
        known = timm.optim.list_optimizers() if hasattr(timm.optim, "list_optimizers") else []
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else " (timm.optim.list_optimizers() names them)"
        reason = str(exc).splitlines()[0]
        raise BeitDataError(f"`opt` {name!r} is not an optimizer timm makes: {reason}{hint}") from None


def build_optimizer(model: torch.nn.Module, *, lr: float, min_lr: float, weight_decay: float,
                    betas: tuple[float, float], warmup: int, total: int, fused: bool = False, opt: str = "adamw",
                    eps: float = 1e-8, momentum: float = 0.9, sched: str = "cosine", decay_steps: int | None = None,
                    decay_rate: float = 0.1):
    """timm's optimizer ``opt`` over ``param_groups``, and its ``Schedule`` of ``sched`` per step.

    The defaults are BEiT's: AdamW (0.9, 0.999, eps 1e-8) and ``WarmupCosine``; any other
    ``sched`` is timm's (``create_scheduler_v2``), in steps, warming up linearly from 0 over
    ``warmup`` steps within the ``total``.

    Args:
        fused: One fused kernel for the whole update instead of per-tensor loops (torch's
            AdamW, Adam and SGD have one).
        eps, betas, momentum: For the optimizers that take them (timm passes each only to those).
        decay_steps, decay_rate: ``step``'s decay interval and factor (``poly``: the power);
            None leaves timm's interval.
    """
    import timm.optim

    extra = {"fused": True} if fused else {}
    try:
        optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                                   eps=eps, betas=betas, param_group_fn=lambda m: param_groups(
                                                       m, weight_decay), **extra)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        raise BeitDataError(f"`opt` {opt}: {str(exc).splitlines()[0]}") from None
    return optimizer, Schedule(build_scheduler(optimizer, sched, lr=lr, min_lr=min_lr, warmup=warmup, total=total,
                                               decay_steps=decay_steps, decay_rate=decay_rate))


def build_scheduler(optimizer: torch.optim.Optimizer, sched: str, *, lr: float, min_lr: float, warmup: int, total: int,
                    decay_steps: int | None = None, decay_rate: float = 0.1) -> Scheduler | None:
    """The scheduler ``sched`` names, counted in optimizer steps: ``WarmupCosine`` for cosine,
    timm's ``create_scheduler_v2`` for the others (None for none)."""
    from timm.scheduler import create_scheduler_v2

    if sched == "cosine":
        return WarmupCosine(optimizer, warmup=warmup, total=total, lr=lr, min_lr=min_lr)
    decay = {} if decay_steps is None else {"decay_epochs": decay_steps}  # epochs of one step each
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=total, warmup_epochs=warmup,
                                           warmup_lr=0.0, min_lr=min_lr, decay_rate=decay_rate, step_on_epochs=False,
                                           updates_per_epoch=1, **decay)
    except ValueError as exc:  # a name an older timm does not know
        raise BeitDataError(f"`sched` {sched}: {exc}") from None
    return scheduler


def mim_loss(model, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, max_masked: int,
             device: torch.device, reduction: str = "mean", precision: Precision | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MIM cross-entropy over the masked patches, with fixed shapes and no host sync.

    Returns the loss, the logits (B, K, vocab) and the targets (B, K), where padding entries
    are ``IGNORE``; the loss is the mean over the masked patches, as with boolean indexing
    (their sum with ``reduction="sum"``). A model with more than one head (BEiT v2's) returns
    a tuple of logits: the loss is the sum of their cross-entropies, and the logits returned are
    the first (the last block's). The forward pass runs under ``precision``'s autocast (by
    default bf16 on a GPU, fp32 on the CPU); the cross-entropy in float32.
    """
    positions, real = masked_positions(mask, max_masked)
    with autocast(device) if precision is None else precision.autocast():
        outputs = model(images, mask, positions)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    targets = tokens.gather(1, positions).masked_fill(~real, IGNORE).flatten()
    loss = sum(F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE, reduction=reduction)
               for logits in outputs)
    return loss, outputs[0], targets.view(positions.shape)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, detached; reading it waits for the device
    logits: torch.Tensor  # (B, K, vocab), of the step's last micro-batch
    targets: torch.Tensor  # (B, K), IGNORE on padding
    grad_norm: torch.Tensor

    def accuracy(self) -> float:
        """Masked-token top-1 accuracy of the step's last micro-batch (reads back from the device)."""
        return ((self.logits.argmax(-1) == self.targets).sum() / (self.targets != IGNORE).sum()).item()


def train_step(model: torch.nn.Module, optimizer, scheduler, images: torch.Tensor, tokens: torch.Tensor,
               mask: torch.Tensor, **kwargs) -> StepOutput:
    """One optimizer step of masked image modeling on one batch (``accumulated_step``'s arguments)."""
    return accumulated_step(model, optimizer, scheduler, [(images, tokens, mask)], accum=1, **kwargs)


def accumulated_step(model: torch.nn.Module, optimizer, scheduler, batches: Iterable[tuple[torch.Tensor, ...]], *,
                     accum: int, max_masked: int, clip_grad: float, device: torch.device,
                     forward: torch.nn.Module | None = None, world_size: int = 1,
                     precision: Precision | None = None, scaler: torch.amp.GradScaler | None = None) -> StepOutput:
    """One optimizer step of masked image modeling over ``accum`` micro-batches; never waits for
    the device.

    The gradient is that of the mean cross-entropy over every masked patch of the global step
    (all micro-batches of all ranks): each micro-batch's backward adds its sum, and the sum is
    divided once by the step's masked patches (gathered over the ranks), times the world size
    that DDP's mean divides by. So one step of batch ``2B`` and two accumulated micro-batches of
    ``B`` (or two ranks of ``B``) give the same update, up to float rounding. DDP syncs the
    gradients on the last micro-batch only. The loss returned is the step's, over all ranks.

    Args:
        batches: ``(images, tokens, mask)`` of each micro-batch, taken one at a time.
        model: The model whose parameters are clipped.
        clip_grad: The largest norm of the gradient; 0 leaves it as it is.
        scheduler: Stepped after the optimizer; ``None`` keeps the learning rate.
        forward: What to call for the forward pass when it is not ``model`` itself: its DDP
            or ``torch.compile`` wrapper.
        precision: The forward pass's autocast (``mim_loss``).
        scaler: fp16's gradient scaler: the backward scales the loss, the gradient is unscaled
            before it is divided and clipped, and a step whose gradient overflowed is skipped
            (the scale then halves), as in timm and unilm. None: no scaling.
    """
    forward = model if forward is None else forward
    optimizer.zero_grad(set_to_none=True)
    total, masked = torch.zeros((), device=device), torch.zeros((), device=device)
    for i, (images, tokens, mask) in enumerate(batches):
        sync = i + 1 == accum or not hasattr(forward, "no_sync")
        with contextlib.nullcontext() if sync else forward.no_sync():
            loss, logits, targets = mim_loss(forward, images, tokens, mask, max_masked, device, reduction="sum",
                                             precision=precision)
            (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach()
        masked += (targets != IGNORE).sum()
    sums = torch.stack([total, masked])
    if world_size > 1:  # one collective for the step's loss and its masked patches, over the ranks
        torch.distributed.all_reduce(sums)
    masked = sums[1].clamp(min=1)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, world_size / masked)
    if clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    else:  # 0 is no clipping, as in DINO and iBOT; the norm is still measured, for the log
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else sums[1] * 0
    if scaler is None:
        optimizer.step()
    else:  # skips the step where the gradient holds an inf or a nan, and updates the scale
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:  # after a skipped fp16 step too: the schedule follows the step count
        scheduler.step()
    return StepOutput(sums[0] / masked, logits, targets, grad_norm)
