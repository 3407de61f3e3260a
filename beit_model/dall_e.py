"""The DALL-E discrete VAE encoder and decoder.

Paper: Zero-Shot Text-to-Image Generation, Ramesh et al. 2021 (appendix A).
The architecture follows OpenAI's ``dall_e`` package, with its parameter names and shapes, so
that OpenAI's ``encoder.pkl`` and ``decoder.pkl`` load into these modules (see ``dvae.py``).
Defaults are OpenAI's: n_hid 256, 2 blocks per group, 4 groups, vocab 8192. The encoder
downsamples by 8 (three max-pools), the decoder upsamples by 8.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Conv2d", "EncoderBlock", "DecoderBlock", "Encoder", "Decoder", "map_pixels", "unmap_pixels",
           "LOGIT_LAPLACE_EPS"]

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0,1] pixels to the range the DALL-E encoder was trained on."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class Conv2d(nn.Module):
    """OpenAI's convolution: parameters named ``w`` and ``b``, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty(n_out, n_in, kw, kw)
        nn.init.normal_(w, std=1 / (n_in * kw**2) ** 0.5)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


def _res_path(kernels: tuple[int, ...], n_in: int, n_hid: int, n_out: int) -> nn.Sequential:
    chans = [n_in, n_hid, n_hid, n_hid, n_out]
    layers = OrderedDict()
    for i, kw in enumerate(kernels, start=1):
        layers[f"relu_{i}"] = nn.ReLU()
        layers[f"conv_{i}"] = Conv2d(chans[i - 1], chans[i], kw)
    return nn.Sequential(layers)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = _res_path((3, 3, 3, 1), n_in, n_out // 4, n_out)
        self.post_gain = 1 / n_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(EncoderBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers)
        self.res_path = _res_path((1, 3, 3, 3), n_in, n_out // 4, n_out)


def _groups(n_blk: int, widths: list[int], block, resample, n_in: int) -> OrderedDict:
    groups = OrderedDict()
    n_layers = len(widths) * n_blk
    for g, width in enumerate(widths, start=1):
        blocks = OrderedDict()
        for i in range(1, n_blk + 1):
            blocks[f"block_{i}"] = block(n_in, width, n_layers)
            n_in = width
        if g < len(widths):
            blocks[resample[0]] = resample[1]()
        groups[f"group_{g}"] = nn.Sequential(blocks)
    return groups


class Encoder(nn.Module):
    """Image (B,3,H,W), already mapped with ``map_pixels``, to logits (B,vocab,H/8,W/8)."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, group_count: int = 4):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
        self.group_count = group_count
        widths = [n_hid * 2**g for g in range(group_count)]  # 1, 2, 4, 8 x n_hid
        layers = OrderedDict(input=Conv2d(3, n_hid, 7))
        layers.update(_groups(n_blk_per_group, widths, EncoderBlock, ("pool", lambda: nn.MaxPool2d(2)), n_hid))
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(widths[-1], vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Codes as one-hot or soft maps (B,vocab,h,w) to statistics (B,6,8h,8w).

    Channels 0-2 are the logit-space means, as in OpenAI's decoder: the image is
    ``unmap_pixels(sigmoid(stats[:, :3]))``. Channels 3-5 are OpenAI's log-scales.
    """

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, n_init: int = 128,
                 group_count: int = 4):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.vocab_size, self.n_init = n_hid, n_blk_per_group, vocab_size, n_init
        widths = [n_hid * 2**g for g in reversed(range(group_count))]  # 8, 4, 2, 1 x n_hid
        layers = OrderedDict(input=Conv2d(vocab_size, n_init, 1))
        upsample = ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        layers.update(_groups(n_blk_per_group, widths, DecoderBlock, upsample, n_init))
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_hid, 6, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] from codes."""
        return unmap_pixels(torch.sigmoid(self(z)[:, :3].float()))
