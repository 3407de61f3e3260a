"""The pieces of BEiT pretraining that the trainer, the benchmarks and the GPU tests share.

The model, the AdamW parameter groups, the learning-rate schedule, the MIM loss and the one
training step (forward, loss, backward, clip, optimizer and scheduler) live here, so that a
benchmark measures exactly the step that ``beit-data pretrain`` runs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from beit_common import BeitDataError
from beit_model.beit_mim import masked_positions
from pipelines.runtime import Precision, autocast

__all__ = ["IGNORE", "build_model", "param_groups", "lr_factor", "build_optimizer", "mim_loss", "StepOutput",
           "train_step", "accumulated_step"]

IGNORE = -100  # target of the padding entries of the fixed-shape masked positions


def build_model(name: str, vocab_size: int, *, drop_path: float = 0.0, layer_scale: float = 0.1) -> torch.nn.Module:
    """A registered ``beit_mim_*`` or ``beitv2_mim_*`` variant with an LM head over ``vocab_size``
    visual tokens."""
    import timm

    import beit_model  # noqa: F401  (registers the beit_mim_* variants)

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


def build_optimizer(model: torch.nn.Module, *, lr: float, min_lr: float, weight_decay: float,
                    betas: tuple[float, float], warmup: int, total: int, fused: bool = False):
    """AdamW over ``param_groups`` and its per-step warmup-then-cosine scheduler.

    Args:
        fused: One fused kernel for the whole update instead of per-tensor loops.
    """
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, lr, min_lr))
    return optimizer, scheduler


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
    if scheduler is not None:
        with warnings.catch_warnings():  # after a skipped fp16 step too: the schedule follows the step count
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            scheduler.step()
    return StepOutput(sums[0] / masked, logits, targets, grad_norm)
