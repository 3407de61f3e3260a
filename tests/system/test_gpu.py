"""Checks that need CUDA: the mixed-device DALI graph against the CPU graph, and GPU runs."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from beit_data.dali_views import IMAGENET_MEAN, IMAGENET_STD, DaliViews, ViewSpec
from beit_data.shards import expand_shards, iter_images
from beit_data.views import ViewRecipe, sample_views

pytestmark = pytest.mark.gpu


def _batch(sample_shards, views=3):
    items = [x for shard in expand_shards(str(sample_shards)) for x in iter_images(shard)]
    recipe = ViewRecipe(views=views, seed=1)
    return [s.image for s, _ in items], [sample_views(recipe, s.key, i.width, i.height) for s, i in items]


@pytest.mark.parametrize("graph", [
    ViewSpec(views=3, size=112, interp="lanczos"),
    ViewSpec(views=1, size=224, interp="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, half=True, roi_decode=True),
])
def test_gpu_graph_matches_cpu_graph(sample_shards, graph):
    encoded, views = _batch(sample_shards, graph.views)
    cpu = DaliViews(graph, batch_size=16, device="cpu")(encoded, views).float()
    gpu = DaliViews(graph, batch_size=16, device="cuda")(encoded, views)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    diff = (gpu.float().cpu() - cpu).abs()
    scale = 1.0 if not graph.half else 1 / 0.225  # normalised output spans ~4.4 units per 1.0 of pixel
    # nvJPEG and libjpeg-turbo differ by rounding, and resampling kernels by a little more.
    assert diff.mean() < 0.01 * scale and diff.max() < 0.35 * scale


def test_tokenize_on_gpu_matches_cpu_rows(sample_shards, tiny_tokenizer, tmp_path):
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    common = dict(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), views=3, progress=False)
    run_tokenize(TokenizeConfig(out=str(tmp_path / "cpu"), device="cpu", **common))
    run_tokenize(TokenizeConfig(out=str(tmp_path / "gpu"), device="cuda", **common))
    for name in ("sample-000000.parquet", "sample-000001.parquet"):
        a, b = pq.read_table(tmp_path / "cpu" / name), pq.read_table(tmp_path / "gpu" / name)
        assert a.drop(["tokens"]).equals(b.drop(["tokens"]))
        ta = np.stack(a.column("tokens").to_numpy(zero_copy_only=False))
        tb = np.stack(b.column("tokens").to_numpy(zero_copy_only=False))
        assert (ta == tb).mean() > 0.9  # bf16 and nvJPEG move a few argmaxes


def test_vqkd_on_gpu_in_bf16_mostly_agrees_with_the_cpu_ids():
    from beit_model.vqkd import VQKDConfig
    from benchmarks.random_vqkd import random_tokenizer
    from pipelines.runtime import autocast

    tok = random_tokenizer(VQKDConfig(embed_dim=128, depth=2, num_heads=2, vocab_size=512, code_dim=8), seed=1)
    x = torch.rand(4, 3, 224, 224)
    cpu = tok.encode(x)
    gpu_tok = tok.to("cuda")
    dtypes = []
    gpu_tok.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    gpu_tok.encode_task_layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with autocast(torch.device("cuda")):
        gpu = gpu_tok.encode(x.cuda())  # fused attention, bf16 encoder matmuls, float32 task layer and codebook
    assert dtypes == [torch.bfloat16, torch.float32]
    assert gpu_tok._fused and (gpu.cpu() == cpu).float().mean() > 0.8


def test_pretrain_on_gpu_resumes_and_learns(sample_shards, sample_tokens, tmp_path):
    from pipelines.pretrain import PretrainConfig, run_pretrain

    cfg = dict(shards=str(sample_shards), tokens=str(sample_tokens), model="beit_mim_tiny_patch16_224",
               batch_size=4, steps=12, warmup_steps=2, lr=1e-3, log_every=1, device="cuda", progress=False)
    first = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), stop_after=6, **cfg))
    second = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), resume=True, **cfg))
    assert first.steps == 6 and second.steps == 12
    assert np.isfinite(second.last_loss) and second.last_loss < first.first_loss
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert ckpt["rng"]["cuda"]


def test_training_step_never_waits_for_the_gpu():
    import timm

    import beit_model.beit_mim  # noqa: F401
    from beit_data.masking import BlockMaskGenerator
    from pipelines.training import build_optimizer, train_step

    device = torch.device("cuda")
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).to(device).train()
    optimizer, scheduler = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999),
                                           warmup=2, total=10)
    masker, rng = BlockMaskGenerator((14, 14)), np.random.default_rng(0)
    images = torch.rand(4, 3, 224, 224, device=device)
    tokens = torch.randint(0, 64, (4, 196), device=device)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(4)])).to(device)
    losses = []
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for _ in range(3):
            out = train_step(model, optimizer, scheduler, images, tokens, mask, max_masked=75, clip_grad=3.0,
                             device=device)
            losses.append(out.loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.stack(losses).isfinite().all()


def test_gpu_stream_matches_cpu_stream(sample_shards, sample_tokens):
    from beit_data.stream import StreamConfig, TrainStream

    cfg = StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=4, num_threads=2)
    cpu_it, gpu_it = TrainStream(cfg).batches(), TrainStream(cfg, device="cuda").batches()
    cpu = [next(cpu_it) for _ in range(3)]
    gpu = [next(gpu_it) for _ in range(3)]  # later runs must not overwrite earlier batches
    torch.cuda.synchronize()
    for c, g in zip(cpu, gpu):
        assert g.images.is_cuda and g.tokens.is_cuda and g.mask.is_cuda
        assert g.keys == c.keys and torch.equal(g.tokens.cpu(), c.tokens) and torch.equal(g.mask.cpu(), c.mask)
        diff = (g.images.float().cpu() - c.images.float()).abs()
        assert diff.mean() < 0.01 / 0.225 and diff.max() < 0.35 / 0.225  # as the graph test: nvJPEG rounding


def test_flex_attention_trains_like_timms_attention_on_the_gpu():
    import copy

    import timm

    import beit_model.beit_mim  # noqa: F401  (registers the beit_mim_* variants)
    from benchmarks.flex_attention import use_flex_attention
    from pipelines.training import build_optimizer, train_step

    device = torch.device("cuda")
    torch.manual_seed(0)
    sdpa = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).to(device).train()
    flex = use_flex_attention(copy.deepcopy(sdpa))
    images, tokens = torch.rand(4, 3, 224, 224, device=device), torch.randint(0, 64, (4, 196), device=device)
    mask = torch.zeros(4, 196, dtype=torch.bool, device=device)
    mask[:, 30:100] = True
    losses = {}
    for name, model in (("sdpa", sdpa), ("flex", flex)):
        opt, sched = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup=1,
                                     total=10)
        forward = torch.compile(model) if name == "flex" else model  # FlexAttention's kernels need compile
        losses[name] = torch.stack([train_step(model, opt, sched, images, tokens, mask, max_masked=75, clip_grad=3.0,
                                               device=device, forward=forward).loss for _ in range(3)]).tolist()
    assert losses["flex"] == pytest.approx(losses["sdpa"], rel=2e-2)  # bf16 autocast on both


def test_a_resumed_gpu_run_follows_the_uninterrupted_one(sample_shards, sample_tokens, tmp_path):
    """Batches, masks, views and RNG states resume exactly on a GPU too; the arithmetic does not (bf16 and
    CUDA kernels that sum in varying order), so the losses agree within a stated tolerance, not bit for bit."""
    import json

    from pipelines.pretrain import PretrainConfig, run_pretrain

    cfg = dict(shards=str(sample_shards), tokens=str(sample_tokens), model="beit_mim_tiny_patch16_224",
               batch_size=4, steps=12, warmup_steps=2, lr=1e-3, log_every=1, device="cuda", progress=False)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **cfg))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=6, **cfg))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **cfg))

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 12
    assert resumed == pytest.approx(straight, rel=2e-2)


def test_accumulated_micro_batches_on_the_gpu_give_the_whole_batch_step_without_waiting():
    """Two micro-batches of 4 against one batch of 8, bf16 autocast: the same loss and gradients
    to bf16 tolerance, and no host-device synchronisation inside the step."""
    import copy

    import timm

    import beit_model.beit_mim  # noqa: F401
    from beit_data.masking import BlockMaskGenerator
    from pipelines.training import accumulated_step, build_optimizer, train_step

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).to(device).train()
    twin = copy.deepcopy(model)
    masker, rng = BlockMaskGenerator((14, 14)), np.random.default_rng(0)
    images = torch.rand(8, 3, 224, 224, device=device)
    tokens = torch.randint(0, 64, (8, 196), device=device)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(8)])).to(device)
    common = dict(max_masked=75, clip_grad=3.0, device=device)
    outs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m, micro in ((model, False), (twin, True)):
            opt, sched = build_optimizer(m, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup=2,
                                         total=10)
            if micro:
                outs.append(accumulated_step(m, opt, sched, iter([(images[:4], tokens[:4], mask[:4]),
                                                                  (images[4:], tokens[4:], mask[4:])]),
                                             accum=2, **common))
            else:
                outs.append(train_step(m, opt, sched, images, tokens, mask, **common))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=2e-2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a.grad.float(), b.grad.float(), rtol=0.1, atol=0.05 * a.grad.abs().max().item())


def test_pretrain_on_gpu_with_grad_accum_resumes(sample_shards, sample_tokens, tmp_path):
    from pipelines.pretrain import PretrainConfig, run_pretrain

    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), model="beit_mim_tiny_patch16_224",
                  batch_size=2, grad_accum=2, steps=6, warmup_steps=2, lr=1e-3, log_every=1, device="cuda",
                  progress=False, num_threads=2, drop_path=0.0, record_batches=True)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "a"), stop_after=3, **common))
    done = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "a"), resume=True, **common))
    assert done.steps == 6 and np.isfinite(done.last_loss)
    rows = (tmp_path / "a" / "batches-rank0.jsonl").read_text().splitlines()
    assert len(rows) == 6 and all(len(json.loads(r)["keys"]) == 4 for r in rows)


def test_online_targets_on_the_gpu_match_the_cpu_stream(sample_shards, tiny_tokenizer):
    """The same keys and masks on both devices; the target views mostly give the same ids (nvJPEG,
    the resize kernels and bf16 move a few argmaxes), and the model's pixels agree as the graphs do."""
    from helpers import online_stream

    cpu, _ = online_stream(sample_shards, tiny_tokenizer)
    gpu, _ = online_stream(sample_shards, tiny_tokenizer, device="cuda")
    for at in ((0, 0), (1, 2)):
        a, b = next(cpu.batches(*at)), next(gpu.batches(*at))
        assert a.keys == b.keys and torch.equal(a.mask, b.mask.cpu())
        assert b.tokens.is_cuda and (a.tokens == b.tokens.cpu()).float().mean() > 0.9
        assert (a.images.float() - b.images.float().cpu()).abs().mean() < 0.01 / 0.225


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_each_precision_trains_on_the_gpu_and_fp16_resumes_with_its_scale(sample_shards, sample_tokens, tmp_path,
                                                                          capfd, precision):
    """The step in fp16 (scaler on) and bf16 on a real GPU: finite losses, the scale saved and
    taken back, and ``auto`` names bf16 exactly where the GPU computes it natively."""
    from pipelines.pretrain import PretrainConfig, run_pretrain
    from pipelines.runtime import resolve_precision

    auto, _ = resolve_precision("auto", torch.device("cuda"))
    assert auto.name == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    cfg = dict(shards=str(sample_shards), tokens=str(sample_tokens), model="beit_mim_tiny_patch16_224",
               batch_size=4, steps=8, warmup_steps=2, lr=1e-3, log_every=1, device="cuda", progress=False,
               precision=precision)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), stop_after=4, **cfg))
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["scaler"]
    assert (saved != {}) == (precision == "fp16")
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), resume=True, **cfg))
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(np.isfinite(r["loss"]) for r in log)
    assert ("loss_scale" in log[-1]) == (precision == "fp16")
    assert f"pretrain: precision {precision} autocast" in capfd.readouterr().err
