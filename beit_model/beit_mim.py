"""BEiT masked image modeling, built from timm's BEiT pieces.

Paper: BEiT: BERT Pre-Training of Image Transformers, Bao et al., ICLR 2022.
The model follows the reference ``modeling_pretrain.py``: timm's ``PatchEmbed``, ``Block`` and
``RelativePositionBias``, plus a learned mask token, one relative-position bias shared by all
blocks, LayerScale, and an LM head over the masked positions only. The weights are
initialised as the reference does, including the per-layer rescaling of the output
projections. ``encoder_state_dict`` converts the encoder into timm ``Beit`` weights.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import register_model
from timm.models.beit import Block, RelativePositionBias

__all__ = ["BeitMIM", "BeitV2MIM", "encoder_state_dict", "masked_positions", "MIM_VARIANTS"]


def masked_positions(mask: torch.Tensor, max_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked patches of each image as a fixed-shape index, computed on the mask's device.

    Boolean indexing (``x[mask]``) has a data-dependent shape, so it makes the host wait for
    the device on every step and breaks ``torch.compile`` graphs. This returns ``(B, K)``
    patch indices, ``K = max_masked``: each row's masked patches in row-major order, padded
    with unmasked ones, and ``(B, K)`` flags marking which entries are masked. Rows must have
    at most ``max_masked`` masked patches (the block mask generator never exceeds it).
    """
    flat = mask.flatten(1)
    index = torch.sort(flat.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :max_masked]
    return index, flat.gather(1, index)


class BeitMIM(nn.Module):
    """A ViT encoder with a mask token and an LM head predicting visual tokens."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, vocab_size: int = 8192, drop_path_rate: float = 0.1,
                 init_values: float = 0.1, init_std: float = 0.02):
        super().__init__()
        self.embed_dim, self.vocab_size, self.depth, self.num_heads = embed_dim, vocab_size, depth, num_heads
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(window_size=self.grid, num_heads=num_heads)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, qkv_bias=True, mlp_ratio=mlp_ratio, drop_path=dpr[i], init_values=init_values,
                  norm_layer=norm, window_size=None)
            for i in range(depth)])
        self.norm = norm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        for p in (self.cls_token, self.mask_token):
            trunc_normal_(p, std=std)
        _init_modules(self, std)
        _rescale(self.blocks, first_layer=1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"}

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings, masked patches replaced by the mask token, after the cls token: (B, 1+N, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            w = mask.flatten(1).unsqueeze(-1).type_as(x)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.type_as(x) * w
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1).type_as(x), x), dim=1)  # (B, 1+N, D)

    def forward_blocks(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the last block, before the final norm: (B, 1+N, D)."""
        x = self.embed(x, mask)
        bias = self.rel_pos_bias()  # (heads, 1+N, 1+N)
        for block in self.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        return x

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.forward_blocks(x, mask))  # (B, 1+N, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the masked patches only.

        Without ``positions``: (M, vocab) for the M masked patches of the batch, in row-major
        order. With ``positions`` from ``masked_positions``: (B, K, vocab), a fixed shape that
        needs no host sync; the padding entries are to be ignored by the loss.
        """
        return self.predict(self.forward_features(x, mask), mask, positions)

    def predict(self, features: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The LM head on the masked patches of normed features (B, 1+N, D); see ``forward``."""
        features = features[:, 1:]  # (B, N, D)
        if positions is None:
            return self.lm_head(features[mask.flatten(1)])  # (M, vocab)
        picked = features.gather(1, positions.unsqueeze(-1).expand(-1, -1, features.shape[-1]))  # (B, K, D)
        return self.lm_head(picked)  # (B, K, vocab)


class BeitV2MIM(BeitMIM):
    """BEiT v2's MIM model: ``BeitMIM`` plus its extra head, which pretrains the cls token.

    The last block's cls token joins the patch tokens of block ``early_layers`` and goes
    through ``head_layers`` more blocks (sharing the relative-position bias); the same norm and
    LM head then predict the masked tokens from them too. ``forward`` returns both logits; the
    loss is the sum of the two cross-entropies. The extra blocks are pretraining only: the
    exported encoder leaves them out.
    """

    def __init__(self, *, early_layers: int, head_layers: int = 2, drop_path_rate: float = 0.1,
                 init_values: float = 0.1, init_std: float = 0.02, **kwargs):
        super().__init__(drop_path_rate=drop_path_rate, init_values=init_values, init_std=init_std, **kwargs)
        if not 1 <= early_layers <= self.depth:
            raise ValueError(f"early_layers must be in [1, {self.depth}], got {early_layers}")
        self.early_layers, self.head_layers = early_layers, head_layers
        dpr = torch.linspace(0, drop_path_rate, max(self.depth, early_layers + head_layers)).tolist()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.cls_pt_layers = nn.ModuleList([
            Block(self.embed_dim, self.num_heads, qkv_bias=True, mlp_ratio=self.blocks[0].mlp.fc1.out_features
                  / self.embed_dim, drop_path=dpr[early_layers + i], init_values=init_values, norm_layer=norm,
                  window_size=None)
            for i in range(head_layers)])
        _init_modules(self.cls_pt_layers, init_std)
        _rescale(self.cls_pt_layers, first_layer=early_layers + 1)

    def forward_both(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed features (B, 1+N, D) of the last block and of the extra head."""
        x = self.embed(x, mask)
        bias = self.rel_pos_bias()
        for i, block in enumerate(self.blocks):
            x = block(x, shared_rel_pos_bias=bias)
            if i + 1 == self.early_layers:
                early = x[:, 1:]
        head = torch.cat((x[:, :1], early), dim=1)
        for block in self.cls_pt_layers:
            head = block(head, shared_rel_pos_bias=bias)
        return self.norm(x), self.norm(head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of the last block and of the extra head, each shaped as ``BeitMIM.forward``'s."""
        main, head = self.forward_both(x, mask)
        return self.predict(main, mask, positions), self.predict(head, mask, positions)


def _init_modules(root: nn.Module, std: float) -> None:
    """The reference's initialisation: truncated normal linear and conv weights, zero biases, unit norms."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


def _rescale(blocks: nn.ModuleList, first_layer: int) -> None:
    """Divide each block's output projections by sqrt(2 * its layer number), counting from ``first_layer``."""
    for layer_id, block in enumerate(blocks, start=first_layer):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


def encoder_state_dict(model: BeitMIM) -> dict[str, torch.Tensor]:
    """The encoder as timm ``Beit`` weights (``use_rel_pos_bias=True``, average pooling).

    The shared relative-position bias is copied into every block, as BEiT does for
    fine-tuning; the final norm becomes timm's ``fc_norm``. The mask token and LM head are
    dropped, and the classifier head is left out.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.startswith(("mask_token", "lm_head", "rel_pos_bias", "cls_pt_layers"))}
    for k in [k for k in state if k.startswith("norm.")]:
        state["fc_norm." + k[5:]] = state.pop(k)
    table = model.rel_pos_bias.relative_position_bias_table.detach()
    for i in range(model.depth):
        state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return {k: v for k, v in state.items() if not k.endswith("relative_position_index")}


def _create(img_size=224, patch_size=16, **kwargs) -> BeitMIM:
    # timm's create_model passes its own loader options; the MIM model has no pretrained weights.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "num_classes", "cache_dir"):
        kwargs.pop(key, None)
    cls = BeitV2MIM if "early_layers" in kwargs else BeitMIM
    return cls(img_size=img_size, patch_size=patch_size, **kwargs)


MIM_VARIANTS = {
    "beit_mim_tiny_patch16_224": dict(embed_dim=96, depth=4, num_heads=3),
    "beit_mim_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "beit_mim_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    # BEiT v2: the extra head after block 9 of 12 (base) and 21 of 24 (large), as the paper.
    "beitv2_mim_tiny_patch16_224": dict(embed_dim=96, depth=4, num_heads=3, early_layers=3),
    "beitv2_mim_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, early_layers=9),
    "beitv2_mim_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, early_layers=21),
}
TIMM_EQUIVALENT = {
    "beit_mim_base_patch16_224": "beit_base_patch16_224",
    "beit_mim_large_patch16_224": "beit_large_patch16_224",
    "beitv2_mim_base_patch16_224": "beitv2_base_patch16_224",
    "beitv2_mim_large_patch16_224": "beitv2_large_patch16_224",
}


@register_model
def beit_mim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> BeitMIM:
    """A 4-block, 96-wide BEiT MIM model for tests and demos."""
    return _create(**{**MIM_VARIANTS["beit_mim_tiny_patch16_224"], **kwargs})


@register_model
def beit_mim_base_patch16_224(pretrained: bool = False, **kwargs) -> BeitMIM:
    """BEiT-B/16 MIM (86M encoder)."""
    return _create(**{**MIM_VARIANTS["beit_mim_base_patch16_224"], **kwargs})


@register_model
def beit_mim_large_patch16_224(pretrained: bool = False, **kwargs) -> BeitMIM:
    """BEiT-L/16 MIM (304M encoder)."""
    return _create(**{**MIM_VARIANTS["beit_mim_large_patch16_224"], **kwargs})


@register_model
def beitv2_mim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> BeitV2MIM:
    """A 4-block, 96-wide BEiT v2 MIM model (extra head after block 3) for tests and demos."""
    return _create(**{**MIM_VARIANTS["beitv2_mim_tiny_patch16_224"], **kwargs})


@register_model
def beitv2_mim_base_patch16_224(pretrained: bool = False, **kwargs) -> BeitV2MIM:
    """BEiT v2-B/16 MIM: the extra head after block 9, 2 blocks deep."""
    return _create(**{**MIM_VARIANTS["beitv2_mim_base_patch16_224"], **kwargs})


@register_model
def beitv2_mim_large_patch16_224(pretrained: bool = False, **kwargs) -> BeitV2MIM:
    """BEiT v2-L/16 MIM: the extra head after block 21, 2 blocks deep."""
    return _create(**{**MIM_VARIANTS["beitv2_mim_large_patch16_224"], **kwargs})
