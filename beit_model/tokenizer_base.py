"""The contract every visual tokenizer offers the stages, apart from the kinds and their files.

A ``Tokenizer`` maps a batch of [0,1] RGB images (B,3,S,S), S its ``input_size``, to token ids
(B, grid, grid) over ``vocab_size`` codes. ``describe()`` is what a token file records of it:
``kind`` (``dvae`` or ``vqkd``), ``name``, the weights' ``fingerprint``, the vocabulary, input
size and grid. ``DVAETokenizer`` (``beit_model.dvae``) and ``VQKDTokenizer`` (``beit_model.vqkd``)
are the two kinds, and ``beit_model.tokenizer.load_tokenizer`` reads their files; they import
this module, and it imports none of them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

from beit_common import BeitDataError

__all__ = ["Tokenizer", "fingerprint"]


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensor names and float32 values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class Tokenizer(nn.Module, ABC):
    """The shared half of a tokenizer; subclasses set the attributes and define ``encode``.

    Attributes:
        kind: ``dvae`` or ``vqkd``.
        name: ``dall-e``, ``dvae`` or ``vqkd``.
        fingerprint: sha256 of the weights that decide the ids.
        vocab_size, input_size, grid: codebook size, square input side, token grid side.
        decoder: A pixel decoder, or None (an attribute of each instance).
    """

    kind: str
    name: str
    fingerprint: str
    vocab_size: int
    input_size: int
    grid: int
    _trusted: bool = False  # set by ``ids(trusted=True)`` for the length of one call

    def describe(self) -> dict:
        """What a token file records of its tokenizer."""
        return {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint, "vocab": self.vocab_size,
                "input_size": self.input_size, "grid": self.grid}

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse batches that would give silent garbage."""
        cell = self.input_size // self.grid
        if x.ndim != 4 or x.shape[1] != 3:
            raise BeitDataError(f"expected an image batch of shape (B,3,H,W), got {tuple(x.shape)}")
        if x.shape[2] % cell or x.shape[3] % cell:
            raise BeitDataError(f"image height and width must be divisible by {cell}, got {tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise BeitDataError(f"expected float images in [0,1], got dtype {x.dtype}")
        if self._trusted:
            return
        lo, hi = torch.aminmax(x.detach())
        if lo < 0 or hi > 1 or torch.isnan(lo):
            raise BeitDataError(f"expected images in [0,1], got values in [{lo.item():.3g}, {hi.item():.3g}]")

    def compile_encoder(self) -> None:
        """``torch.compile`` the encoder in place; the weights, and so the fingerprint, stay."""
        self.encoder = torch.compile(self.encoder)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, grid, grid) for images in [0,1]."""

    def ids(self, pixels: torch.Tensor, *, pad_to: int | None = None, trusted: bool = False,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Token ids (N, grid, grid) of views in [0,1], without gradients, under autocast to
        ``dtype`` (None: bf16 on a GPU, float32 on the CPU; float32: no autocast).

        With ``pad_to``, a short batch is padded to that size, so that a compiled encoder sees
        one shape and never recompiles. ``trusted`` skips the check that the values lie in [0,1]
        (it waits for the device) for views this project's own loader made, which are in [0,1]
        by construction; shapes and dtypes are still checked.
        """
        n = len(pixels)
        if pad_to is not None and n < pad_to:
            pixels = torch.cat([pixels, pixels.new_zeros((pad_to - n, *pixels.shape[1:]))])
        self._trusted = trusted
        try:
            dtype = dtype or (torch.bfloat16 if pixels.is_cuda else torch.float32)
            with torch.inference_mode(), torch.autocast(pixels.device.type, dtype=dtype,
                                                        enabled=dtype != torch.float32):
                return self.encode(pixels.float())[:n]
        finally:
            self._trusted = False

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] from ids (B, grid, grid), where the tokenizer has a pixel decoder."""
        raise BeitDataError(f"tokenizer {self.name} has no pixel decoder")
