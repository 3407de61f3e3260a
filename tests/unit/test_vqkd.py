"""BEiT v2's VQ-KD tokenizer: the released checkpoint layout loads, and the ids follow the
reference's path step by step (written out here from the paper's code, independently of timm)."""


import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, save_released

from beit_common import BeitDataError
from beit_model.tokenizer import load_tokenizer
from beit_model.vqkd import VQKDTokenizer
from benchmarks.random_vqkd import random_tokenizer


def reference_path(state: dict, x: torch.Tensor, heads: int) -> dict:
    """The reference's arithmetic on the released tensors: pre_process, ViT encoder (q/v biases,
    absolute positions, no LayerScale), fc_norm on the patch tokens, encode_task_layer, l2norm,
    and the nearest code by |z|^2 + |e|^2 - 2 z.e."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def linear(t, name, bias=None):
        return F.linear(t, state[f"{name}.weight"], state.get(f"{name}.bias") if bias is None else bias)

    data = x * 255.0
    data = data / 127.5 - 1.0
    t = F.conv2d(data, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    b, n, c = t.shape
    t = torch.cat([state["encoder.cls_token"].expand(b, -1, -1), t], 1) + state["encoder.pos_embed"]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    for i in range(depth):
        p = f"encoder.blocks.{i}"
        q_bias, v_bias = state[f"{p}.attn.q_bias"], state[f"{p}.attn.v_bias"]
        qkv = linear(ln(t, f"{p}.norm1"), f"{p}.attn.qkv", torch.cat([q_bias, torch.zeros_like(v_bias), v_bias]))
        q, k, v = qkv.reshape(b, n + 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q = q * (c // heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        t = t + linear((attn @ v).transpose(1, 2).reshape(b, n + 1, c), f"{p}.attn.proj")
        t = t + linear(F.gelu(linear(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    features = ln(t[:, 1:], "encoder.fc_norm")
    z = linear(torch.tanh(linear(features, "encode_task_layer.0")), "encode_task_layer.2")
    z = F.normalize(z, p=2, dim=-1).reshape(-1, z.shape[-1])
    e = state["quantize.embedding.weight"]
    d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z, e)
    side = x.shape[-1] // 16
    return {"features": features, "codes": z.reshape(b, n, -1), "ids": d.argmin(1).view(b, side, side)}


@pytest.fixture(scope="module")
def small_vqkd(tmp_path_factory):
    return save_released(tmp_path_factory.mktemp("vqkd") / "vqkd_small.pth", random_tokenizer(SMALL, seed=1))


def test_the_released_layout_loads_with_its_sizes_read_off_the_shapes(small_vqkd, tmp_path):
    tok = load_tokenizer(small_vqkd)
    assert isinstance(tok, VQKDTokenizer) and tok.cfg == SMALL
    assert tok.describe() == {"kind": "vqkd", "name": "vqkd", "fingerprint": tok.fingerprint, "vocab": 512,
                              "input_size": 224, "grid": 14}
    again = load_tokenizer(save_released(tmp_path / "sd.pth", tok, key="state_dict"))
    assert again.fingerprint == tok.fingerprint  # the decoder, teacher and loss entries are ignored
    with pytest.raises(BeitDataError, match="no pixel decoder"):
        tok.decode(torch.zeros(1, 14, 14, dtype=torch.long))


def test_ids_follow_the_reference_path_step_by_step(small_vqkd):
    tok = load_tokenizer(small_vqkd)
    state = torch.load(small_vqkd, weights_only=False)["model"]
    torch.manual_seed(0)
    x = torch.rand(3, 3, 224, 224)
    want = reference_path(state, x, heads=SMALL.num_heads)
    assert torch.allclose(tok.features(x), want["features"], atol=1e-5)
    assert torch.allclose(tok.codes(x), want["codes"], atol=1e-5)
    ids = tok.encode(x)
    assert ids.shape == (3, 14, 14) and torch.equal(ids, want["ids"])
    assert len(ids.unique()) > 50  # random weights still spread over the codebook: the check can fail


def test_a_damaged_checkpoint_is_one_line_naming_the_file(small_vqkd, tmp_path):
    ckpt = torch.load(small_vqkd, weights_only=False)
    del ckpt["model"]["encoder.blocks.1.attn.q_bias"]
    torch.save(ckpt, tmp_path / "broken.pth")
    with pytest.raises(BeitDataError, match=r"broken.pth: not a VQ-KD checkpoint.*q_bias") as info:
        load_tokenizer(tmp_path / "broken.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(BeitDataError, match="224-pixel inputs"):
        load_tokenizer(small_vqkd, input_size=112)
