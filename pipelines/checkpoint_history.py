"""A run's kept checkpoints: earlier states beside the latest, to export, probe or roll back to.

``RUN/checkpoint.pt`` is the latest checkpoint: ``--resume`` takes it and every save replaces
it. Besides it a run keeps, in ``RUN/checkpoints/`` (``History``):

- the checkpoint that ends every ``checkpoint_every_epochs``-th epoch, for good (unilm's
  ``save_ckpt_freq``): ``step-SSSSSSSS-epoch-EEEE.pt``, after ``EEEE`` epochs;
- the ``keep_checkpoints`` newest checkpoints (timm's ``--checkpoint-hist``):
  ``step-SSSSSSSS.pt``, deleted as newer ones are kept.

The names are zero-padded, so they sort by step (``S`` is the optimizer steps taken, the
checkpoint's own ``step``). A kept checkpoint is the latest made again under its name, not a
second ``torch.save``: a hard link for a local folder (a copy where the disk has none), a
server-side copy for an object-storage prefix (``copy_atomic``).

Every file appears whole under its name, and a kept one is deleted only after the newest is
complete, one whole file at a time: a run killed at any moment leaves every listed checkpoint
whole (a temporary file is never listed, and the next start removes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from beit_common import BeitDataError, Location
from beit_common.files import copy_atomic, remove_file
from beit_common.listing import list_files
from pipelines.checkpoint import CHECKPOINT, checkpoint_path

__all__ = ["KEPT", "Kept", "History", "kept_name", "kept_checkpoints", "run_checkpoint", "to_prune"]

KEPT = "checkpoints"
_NAME = re.compile(r"step-(\d+)(?:-epoch-(\d+))?\.pt")


@dataclass(frozen=True)
class Kept:
    """A kept checkpoint: its step, the epochs it ends where it is kept for good (else None), and where it is."""

    step: int
    epoch: int | None
    location: Location


def kept_name(step: int, epoch: int | None = None) -> str:
    """``step-00012000.pt``, or ``step-00012000-epoch-0300.pt`` for one kept for good after 300 epochs."""
    return f"step-{step:08d}" + (f"-epoch-{epoch:04d}" if epoch is not None else "") + ".pt"


def kept_checkpoints(run: Location) -> list[Kept]:
    """The kept checkpoints of a run folder or prefix, by step; none for a run from before them."""
    found = []
    for location in list_files(run / KEPT, ".pt"):
        match = _NAME.fullmatch(location.name)
        if match:
            found.append(Kept(int(match[1]), int(match[2]) if match[2] else None, location))
    return sorted(found, key=lambda k: (k.step, k.epoch is None))


def run_checkpoint(run: Location, step: int | None = None) -> Location:
    """The checkpoint of a run: its latest (``RUN/checkpoint.pt``), or the one kept at ``step``.

    Raises:
        BeitDataError: For a step the run keeps no checkpoint of, listing those it keeps.
    """
    if step is None:
        return checkpoint_path(run)
    kept = kept_checkpoints(run)
    for k in kept:
        if k.step == step:
            return k.location
    what = (f"it keeps steps {', '.join(str(k.step) for k in kept)}" if kept
            else "it keeps none (pretrain --keep-checkpoints, --checkpoint-every-epochs)")
    raise BeitDataError(f"{run} keeps no checkpoint of step {step}: {what}; without `step`, the latest "
                        f"({CHECKPOINT})")


def to_prune(kept: list[Kept], newest: int, step: int) -> list[Kept]:
    """The kept checkpoints a run at ``step`` deletes: those of no kept epoch outside the
    ``newest`` newest. Those past ``step`` stay too: they are the future of a run rolled back to
    an earlier checkpoint, for its user to keep or delete."""
    upto = [k for k in kept if k.step <= step]
    recent = upto[-newest:] if newest else []
    return [k for k in upto if k.epoch is None and k not in recent]


@dataclass(frozen=True)
class History:
    """What a run keeps besides its latest checkpoint.

    Attributes:
        run: Where the kept checkpoints live: the run folder, or the prefix an object-storage
            run folder mirrors (the latest is uploaded there before it is kept).
        newest: How many of the newest checkpoints it keeps (``keep_checkpoints``).
        every_epochs: It keeps the checkpoint that ends every so many epochs for good; 0: none
            (``checkpoint_every_epochs``).
    """

    run: Location
    newest: int = 0
    every_epochs: int = 0

    def keeps_epoch(self, epochs: int) -> bool:
        """Whether the checkpoint that ends ``epochs`` epochs is kept for good."""
        return bool(self.every_epochs) and epochs % self.every_epochs == 0

    def keep(self, step: int, epoch: int | None = None) -> list[Kept]:
        """Keep the latest checkpoint, complete at ``RUN/checkpoint.pt``, as that of ``step``
        (with ``epoch``, the epochs it ends, kept for good), where it is due; then delete those
        no longer kept. Returns them."""
        if epoch is not None or self.newest:
            target = self.run / KEPT / kept_name(step, epoch)
            local = target.local_path()
            if local is not None:  # an object-storage prefix needs no folder
                local.parent.mkdir(exist_ok=True)
            copy_atomic(checkpoint_path(self.run), target)
        gone = to_prune(kept_checkpoints(self.run), self.newest, step)
        for k in gone:  # oldest first, each whole
            remove_file(k.location)
        return gone
