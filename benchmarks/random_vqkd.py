"""A BEiT v2 VQ-KD tokenizer with random weights, and its weights in the released file's layout.

The benchmarks time a tokenizer of the real one's cost, and the tests load a released-layout file
through ``beit_model.vqkd.from_state``, without the 1 GB download. Neither is part of the product.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_model.vqkd import VQKDConfig, VQKDTokenizer

__all__ = ["released_layout", "random_tokenizer"]


def released_layout(tokenizer: VQKDTokenizer, *, extra: bool = True) -> dict:
    """A checkpoint dict in the released file's layout (``{"model": ...}``): the tokenizer's weights,
    plus, with ``extra``, stand-ins for the decoder, quantizer statistics, teacher and loss entries
    the loader must ignore."""
    state = {k: v for k, v in tokenizer.state_dict().items() if k != "codebook"}
    state["quantize.embedding.weight"] = tokenizer.codebook.clone()
    if extra:
        vocab, dim = tokenizer.codebook.shape
        state.update({"quantize.cluster_size": torch.ones(vocab), "quantize.embedding.cluster_size": torch.ones(vocab),
                      "quantize.embedding.embed_avg": torch.zeros(vocab, dim),
                      "quantize.embedding.initted": torch.tensor([1.0]),
                      "decoder.patch_embed.proj.weight": torch.zeros(tokenizer.cfg.embed_dim, dim, 1, 1),
                      "decode_task_layer.0.weight": torch.zeros(4, 4), "teacher_model.proj": torch.zeros(4),
                      "scaling_layer.shift": torch.zeros(1, 3, 1, 1), "loss_fn.weight": torch.zeros(1)})
    return {"model": state, "epoch": 99, "args": None}


def random_tokenizer(cfg: VQKDConfig | None = None, seed: int = 0) -> VQKDTokenizer:
    """A VQ-KD tokenizer with random weights and a unit-norm codebook (ViT-B/16 sizes by default)."""
    cfg = cfg or VQKDConfig()
    torch.manual_seed(seed)
    tokenizer = VQKDTokenizer(cfg)
    for name, p in tokenizer.encoder.named_parameters():
        if name.endswith(("q_bias", "v_bias")) or "pos_embed" in name or "cls_token" in name:
            nn.init.normal_(p, std=0.02)
    tokenizer.codebook.copy_(F.normalize(torch.randn(cfg.vocab_size, cfg.code_dim), dim=-1))
    tokenizer.refresh_fingerprint()
    return tokenizer.eval()
