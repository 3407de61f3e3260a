import math

import numpy as np
import pytest
import timm
import torch

import beit_model.beit_mim  # noqa: F401
from beit_data.masking import BlockMaskGenerator
from beit_model.beit_mim import encoder_state_dict, masked_positions
from pipelines.training import IGNORE, lr_factor, mim_loss, param_groups


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()


def test_variants_are_registered_in_timm():
    names = timm.list_models("beit_mim_*")
    assert {"beit_mim_tiny_patch16_224", "beit_mim_base_patch16_224", "beit_mim_large_patch16_224"} <= set(names)
    base = timm.create_model("beit_mim_base_patch16_224", vocab_size=8192)
    encoder = sum(p.numel() for n, p in base.named_parameters() if not n.startswith(("lm_head", "mask_token")))
    assert 85e6 < encoder < 87e6  # ViT-B/16
    assert base.grid == (14, 14) and base.lm_head.out_features == 8192


def test_lm_head_only_on_masked_positions(model):
    x = torch.rand(2, 3, 224, 224)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 50:55] = True
    logits = model(x, mask)
    assert logits.shape == (15, 64)
    # A masked patch's pixels do not reach the model: changing them changes nothing.
    x2 = x.clone()
    x2[0, :, :16, :16] = 0  # patch 0 of image 0, which is masked
    assert torch.allclose(model(x2, mask), logits, atol=1e-5)
    feats = model.forward_features(x, mask)
    assert feats.shape == (2, 197, 96)
    assert torch.allclose(model.lm_head(feats[:, 1:][mask]), logits, atol=1e-5)


def test_fixed_shape_positions_match_boolean_indexing(model):
    rng = np.random.default_rng(0)
    masker = BlockMaskGenerator((14, 14), num_masked=75)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(6)]))
    mask[5] = False
    mask[5, [3, 100, 7]] = True  # a short row: the rest of it is padding
    index, real = masked_positions(mask, 75)
    assert index.shape == real.shape == (6, 75)
    assert real.sum(1).tolist() == mask.sum(1).tolist()
    for row in range(6):  # each row's masked patches come first, in row-major order
        n = int(mask[row].sum())
        assert index[row, :n].tolist() == torch.nonzero(mask[row]).flatten().tolist()
        assert not mask[row, index[row, n:]].any()

    x = torch.rand(6, 3, 224, 224)
    tokens = torch.randint(0, 64, (6, 196))
    loss, logits, targets = mim_loss(model, x, tokens, mask, 75, torch.device("cpu"))
    assert logits.shape == (6, 75, 64) and targets.shape == (6, 75)
    assert (targets == IGNORE).sum() == 6 * 75 - mask.sum()
    reference = torch.nn.functional.cross_entropy(model(x, mask), tokens[mask])  # boolean indexing
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(logits[real], model(x, mask), atol=1e-5)


def test_fixed_shape_positions_compile_into_one_graph(model):
    x, mask = torch.rand(2, 3, 224, 224), torch.zeros(2, 196, dtype=torch.bool)
    mask[:, 20:95] = True
    positions, _ = masked_positions(mask, 75)
    torch._dynamo.reset()
    whole = torch._dynamo.explain(model)(x, mask, positions)
    assert (whole.graph_count, whole.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    split = torch._dynamo.explain(model)(x, mask)  # boolean indexing: nonzero breaks the graph
    assert split.graph_break_count >= 1 and "nonzero" in str(split.break_reasons[0].reason)
    torch._dynamo.reset()


def test_initialisation_follows_the_reference(model):
    torch.manual_seed(1)
    fresh = timm.create_model("beit_mim_base_patch16_224", vocab_size=8192)
    for layer_id, block in enumerate(fresh.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer_id)
        assert block.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
    assert fresh.blocks[0].attn.relative_position_bias_table is None  # one shared bias
    assert fresh.rel_pos_bias.relative_position_bias_table.shape == (27 * 27 + 3, 12)


def test_weight_decay_groups(model):
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table", "blocks.0.gamma_1",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight"} - skipped == {"blocks.0.attn.qkv.weight"}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 100, 1.5e-3, 1e-5) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 10, 100, 1.5e-3, 1e-5) * 1.5e-3 == pytest.approx(1e-5)
    assert f[99] * 1.5e-3 < 1.1e-5


def test_export_loads_in_timm_and_gives_the_same_features(model, tmp_path):
    torch.save(encoder_state_dict(model), tmp_path / "enc.pth")
    ref = timm.create_model("beit_base_patch16_224", embed_dim=96, depth=4, num_heads=3, num_classes=0,
                            checkpoint_path=str(tmp_path / "enc.pth")).eval()
    with_head = timm.create_model("beit_base_patch16_224", embed_dim=96, depth=4, num_heads=3)
    missing, unexpected = with_head.load_state_dict(torch.load(tmp_path / "enc.pth"), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(x), model.forward_blocks(x), atol=1e-5)
        pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.allclose(pooled, model.norm(model.forward_blocks(x)[:, 1:].mean(1)), atol=1e-5)


def test_flex_attention_keeps_the_weights_and_the_outputs():
    """FlexAttention runs its forward on the CPU (its backward needs a GPU: tests/system/test_gpu.py)."""
    import copy

    from benchmarks.flex_attention import FlexRelPosAttention, use_flex_attention

    torch.manual_seed(0)
    sdpa = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).eval()
    flex = use_flex_attention(copy.deepcopy(sdpa))
    assert all(type(b.attn) is FlexRelPosAttention for b in flex.blocks)
    assert flex.state_dict().keys() == sdpa.state_dict().keys()
    x, mask = torch.rand(2, 3, 224, 224), torch.zeros(2, 196, dtype=torch.bool)
    mask[:, 20:60] = True
    with torch.no_grad():
        assert torch.allclose(flex(x, mask), sdpa(x, mask), atol=1e-5)


def tiny_training(fused: bool = False):
    """A tiny MIM model in training mode, its optimizer and scheduler, and one batch (images, tokens, mask)."""
    from pipelines.training import build_optimizer

    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).train()
    x, tokens = torch.rand(2, 3, 224, 224), torch.randint(0, 64, (2, 196))
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, :40] = True
    opt, sched = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup=1,
                                 total=10, fused=fused)
    return model, opt, sched, (x, tokens, mask)


def test_fused_adamw_gives_the_same_losses():
    from pipelines.training import train_step

    losses = {}
    for fused in (False, True):
        m, opt, sched, batch = tiny_training(fused)  # the same seed, so the same weights and batch
        losses[fused] = [train_step(m, opt, sched, *batch, max_masked=75, clip_grad=3.0,
                                    device=torch.device("cpu")).loss.item() for _ in range(4)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True][3] < losses[True][0]


def test_beitv2_extra_head_reads_the_last_cls_token_and_the_early_patch_tokens(tmp_path):
    import torch.nn.functional as F

    from beit_model.beit_mim import BeitMIM

    torch.manual_seed(0)
    v2 = timm.create_model("beitv2_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).eval()
    assert v2.early_layers == 3 and len(v2.cls_pt_layers) == 2
    assert {n.split(".")[0] for n, _ in v2.named_parameters()} >= {"cls_pt_layers", "lm_head", "norm"}
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[0, :40], mask[1, 100:175] = True, True
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        main, head = v2(x, mask)
        v1 = BeitMIM(embed_dim=96, depth=4, num_heads=3, vocab_size=64, drop_path_rate=0.0).eval()
        v1.load_state_dict({k: v for k, v in v2.state_dict().items() if not k.startswith("cls_pt_layers")})
        assert torch.equal(main, v1(x, mask))  # the main path is BEiT's
        h, bias = v2.embed(x, mask), v2.rel_pos_bias()
        for block in v2.blocks[:3]:
            h = block(h, shared_rel_pos_bias=bias)
        joined = torch.cat([v2.forward_blocks(x, mask)[:, :1], h[:, 1:]], 1)
        for block in v2.cls_pt_layers:
            joined = block(joined, shared_rel_pos_bias=bias)
        assert torch.allclose(head, v2.lm_head(v2.norm(joined)[:, 1:][mask]), atol=1e-5)
        assert not torch.allclose(head, main, atol=1e-3)
    tokens = torch.randint(0, 64, (2, 196))
    loss, logits, targets = mim_loss(v2, x, tokens, mask, 75, torch.device("cpu"))
    with torch.no_grad():
        want = F.cross_entropy(main, tokens[mask]) + F.cross_entropy(head, tokens[mask])
    assert torch.allclose(loss, want, atol=1e-5) and logits.shape == (2, 75, 64)
    # Export leaves the extra head out: what remains is a timm Beit encoder.
    torch.save(encoder_state_dict(v2), tmp_path / "enc.pth")
    ref = timm.create_model("beitv2_base_patch16_224", embed_dim=96, depth=4, num_heads=3, num_classes=0,
                            init_values=0.1, checkpoint_path=str(tmp_path / "enc.pth")).eval()
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(x), v2.forward_blocks(x), atol=1e-5)


def test_train_step_takes_a_compiled_module():
    """A compiled module's truth value calls len(), which raises: the step must never ask for it."""
    from pipelines.training import train_step

    model, opt, sched, batch = tiny_training()
    out = train_step(model, opt, sched, *batch, max_masked=75, clip_grad=3.0, device=torch.device("cpu"),
                     forward=torch.compile(model, backend="eager"))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("accum", [2, 3])
def test_accumulated_micro_batches_give_the_step_of_their_union(accum):
    """One step of batch ``accum * B`` and ``accum`` accumulated micro-batches of ``B`` give the
    same loss and weights (drop path 0), even where the micro-batches mask different numbers of
    patches: the loss is the mean over every masked patch of the step, not a mean of means."""
    import copy

    from pipelines.training import accumulated_step, build_optimizer, train_step

    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).train()
    n = 2 * accum
    x, tokens = torch.rand(n, 3, 224, 224), torch.randint(0, 64, (n, 196))
    mask = torch.zeros(n, 196, dtype=torch.bool)
    for i in range(n):
        mask[i, : 10 + 13 * i] = True  # each image its own count: 10, 23, 36, ...
    models = {"whole": model, "micro": copy.deepcopy(model)}
    micro = [(x[i:i + 2], tokens[i:i + 2], mask[i:i + 2]) for i in range(0, n, 2)]
    losses, grads = {}, {}
    for name, m in models.items():
        opt, sched = build_optimizer(m, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup=1,
                                     total=10)
        common = dict(max_masked=75, clip_grad=3.0, device=torch.device("cpu"))
        losses[name] = []
        for step in range(2):
            if name == "whole":
                out = train_step(m, opt, sched, x, tokens, mask, **common)
            else:
                out = accumulated_step(m, opt, sched, iter(micro), accum=accum, **common)
            losses[name].append(out.loss.item())
            if step == 0:  # the gradients of the first step, from the same weights
                grads[name] = [p.grad.clone() for p in m.parameters()]
    assert losses["micro"] == pytest.approx(losses["whole"], rel=1e-5)
    names = [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, grads["whole"], grads["micro"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item()), name
    # The weights after two steps agree far below one update (Adam turns the rounding of
    # near-zero gradients into updates of up to the learning rate).
    for name, a, b in zip(names, models["whole"].parameters(), models["micro"].parameters()):
        assert torch.allclose(a, b, atol=1e-4), name
    # What a mean of per-micro-batch means would have given instead: a different loss.
    from pipelines.training import mim_loss

    with torch.no_grad():
        means = [mim_loss(models["micro"], *batch, 75, torch.device("cpu"))[0] for batch in micro]
        whole = mim_loss(models["micro"], x, tokens, mask, 75, torch.device("cpu"))[0]
    assert abs(sum(means).item() / accum - whole.item()) > 1e-4
