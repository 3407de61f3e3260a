"""BEiT's attention with the shared relative-position bias applied through FlexAttention.

timm's ``Attention`` passes the float bias to ``scaled_dot_product_attention`` as an
``attn_mask``, which rules out the flash kernel: PyTorch falls back to the memory-efficient
one, reading a (heads, N, N) bias tensor per batch. FlexAttention instead adds the bias inside
a kernel that ``torch.compile`` generates (``score_mod``), indexing the (heads, N, N) table
directly. The module keeps timm's parameters and buffers, so state dicts and exports are
unchanged; only ``forward`` differs. Without ``torch.compile`` FlexAttention runs a reference
implementation, which is for correctness checks, not speed.

It is a trial of ``benchmarks/pretrain.py --flex-attention``, not yet a choice a run can make,
so it lives with the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention

__all__ = ["FlexRelPosAttention", "use_flex_attention"]


class FlexRelPosAttention(Attention):
    """timm's BEiT ``Attention``, with the shared relative-position bias added by ``score_mod``."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        if self.relative_position_bias_table is not None or self.attn_drop.p > 0:
            return super().forward(x, shared_rel_pos_bias)  # per-block tables and dropout: timm's path
        B, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)  # (B, N, 3*C)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        if shared_rel_pos_bias is None:
            out = flex_attention(q, k, v, scale=self.scale)
        else:
            bias = shared_rel_pos_bias.reshape(self.num_heads, N, N).to(q.dtype)  # (H, N, N)

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]

            out = flex_attention(q, k, v, score_mod=add_bias, scale=self.scale)
        x = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


def use_flex_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every timm BEiT ``Attention`` in ``model`` to ``FlexRelPosAttention``, in place.

    Only the class changes: parameters, buffers and state-dict keys stay as they are.
    """
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = FlexRelPosAttention
    return model
