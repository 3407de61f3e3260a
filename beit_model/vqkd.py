"""BEiT v2's VQ-KD tokenizer, loaded from the released checkpoints without the unilm code.

Paper: BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers, Peng et al., 2022.
A released file (for example ``vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth``) is a
dict whose ``model`` (or ``state_dict``) holds ``encoder.*`` (a ViT-B/16: q and v biases,
absolute position embeddings, no relative bias, no LayerScale, ``fc_norm`` on the patch
tokens), ``encode_task_layer.*`` (Linear, Tanh, Linear down to the code size),
``quantize.embedding.weight`` (8192 x 32, unit rows) and the decoder, teacher and loss
weights, which tokenizing does not need.

Token ids follow the reference's path: [0,1] pixels to [-1,1]; the encoder (timm's ``Beit``,
whose unfused attention is the reference's arithmetic); ``fc_norm`` on the patch tokens;
``encode_task_layer`` in float32; l2-normalisation; the code at the smallest
``|z|^2 + |e|^2 - 2 z.e``. There is no one-hot over the codebook and no collective call, and
the codebook usage statistics the reference updates in ``eval`` are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_common import BeitDataError
from beit_model.tokenizer_base import Tokenizer, fingerprint

__all__ = ["VQKDConfig", "VQKDTokenizer", "is_vqkd", "from_state", "HEAD_DIM"]

HEAD_DIM = 64  # the head count is not in the shapes; every released ViT (S, B, L) uses 64-wide heads
_IGNORED = ("decoder.", "decode_task_layer.", "teacher", "scaling", "loss", "quantize.cluster_size",
            "quantize.embedding.cluster_size", "quantize.embedding.embed_avg", "quantize.embedding.initted")


@dataclass(frozen=True, kw_only=True)
class VQKDConfig:
    """The encoder and codebook sizes; ViT-B/16 with an 8192 x 32 codebook by default."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 8192
    code_dim: int = 32

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class VQKDTokenizer(Tokenizer):
    """The VQ-KD encoder, task layer and codebook behind the tokenizer contract."""

    kind = "vqkd"

    def __init__(self, cfg: VQKDConfig = VQKDConfig()):
        super().__init__()
        from timm.models.beit import Beit

        self.cfg = cfg
        self.encoder = Beit(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, global_pool="avg",
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                            mlp_ratio=cfg.mlp_ratio, qkv_bias=True, use_abs_pos_emb=True, use_rel_pos_bias=False,
                            use_shared_rel_pos_bias=False, init_values=None,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.encode_task_layer = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.Tanh(),
                                               nn.Linear(cfg.embed_dim, cfg.code_dim))
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, cfg.code_dim))
        self.name, self.vocab_size = "vqkd", cfg.vocab_size
        self.input_size, self.grid = cfg.img_size, cfg.grid
        self.fingerprint, self.decoder = "", None
        self._fused = None

    def refresh_fingerprint(self) -> None:
        self.fingerprint = fingerprint(self.state_dict())

    def _use_fused_attention(self, fused: bool) -> None:
        """Fused attention on a GPU; on the CPU the reference's own arithmetic, for its exact ids."""
        if fused != self._fused:
            for block in self.encoder.blocks:
                block.attn.fused_attn = fused
            self._fused = fused

    def compile_encoder(self) -> None:
        self.encoder.forward_features = torch.compile(self.encoder.forward_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens after ``fc_norm``: (B, N, embed_dim), for images in [0,1]."""
        self.check_images(x)
        self._use_fused_attention(x.is_cuda)
        tokens = self.encoder.forward_features(x * 255.0 / 127.5 - 1.0)  # [0,1] to [-1,1], as the reference
        return self.encoder.fc_norm(tokens[:, 1:])

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The l2-normalised task-layer outputs (B, N, code_dim); the encoder follows the caller's
        autocast (bf16 on a GPU), the task layer runs in float32 as the reference's."""
        features = self.features(x)
        with torch.autocast(x.device.type, enabled=False):
            z = self.encode_task_layer(features.float())
        return F.normalize(z, p=2, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids (B, N) of the codebook rows closest to ``z`` (B, N, code_dim), by the reference's formula."""
        e = self.codebook.float()
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
        return d.argmin(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nearest(self.codes(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, grid, grid) for images in [0,1]."""
        return self(x).reshape(x.shape[0], self.grid, self.grid)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise BeitDataError("a VQ-KD tokenizer has no pixel decoder: its decoder reconstructs teacher "
                            "features, not images")


def _model_state(obj: dict) -> dict:
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def is_vqkd(obj) -> bool:
    """Whether a loaded file has the released VQ-KD layout."""
    if not isinstance(obj, dict):
        return False
    state = _model_state(obj)
    return "quantize.embedding.weight" in state and "encode_task_layer.0.weight" in state


def _config(state: dict, path: Path) -> VQKDConfig:
    """The sizes read off the tensor shapes; the head count assumes ``HEAD_DIM``-wide heads."""
    try:
        embed_dim, _, patch, _ = state["encoder.patch_embed.proj.weight"].shape
        positions = state["encoder.pos_embed"].shape[1] - 1
        depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
        hidden = state["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        vocab, code_dim = state["quantize.embedding.weight"].shape
    except (KeyError, ValueError) as exc:
        raise BeitDataError(f"{path}: not a VQ-KD checkpoint in the released layout (missing or misshapen "
                            f"{exc})") from None
    side = round(positions ** 0.5)
    if side * side != positions or embed_dim % HEAD_DIM and embed_dim > HEAD_DIM:
        raise BeitDataError(f"{path}: a VQ-KD encoder of width {embed_dim} and {positions} positions is not a "
                            f"square ViT with {HEAD_DIM}-wide heads")
    return VQKDConfig(img_size=side * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                      num_heads=max(1, embed_dim // HEAD_DIM), mlp_ratio=hidden / embed_dim, vocab_size=vocab,
                      code_dim=code_dim)


def from_state(obj: dict, path: str | Path = "checkpoint") -> VQKDTokenizer:
    """A tokenizer from a loaded released checkpoint (or its ``model`` dict).

    Raises:
        BeitDataError: When a needed tensor is missing or has the wrong shape.
    """
    path = Path(path)
    state = _model_state(obj)
    cfg = _config(state, path)
    tokenizer = VQKDTokenizer(cfg)
    wanted = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    wanted["codebook"] = wanted.pop("quantize.embedding.weight")
    try:
        tokenizer.load_state_dict(wanted, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise BeitDataError(f"{path}: not a VQ-KD checkpoint in the released layout: "
                            f"{'; '.join(lines[1:3] or lines)[:400]}") from None
    tokenizer.refresh_fingerprint()
    return tokenizer.eval()
