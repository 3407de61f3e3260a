"""Precision: which one a device gets, and fp16's gradient scaler in a training step."""

import pytest
import timm
import torch

import beit_model.beit_mim  # noqa: F401  (registers the beit_mim_* variants)
from beit_common import BeitDataError
from pipelines.runtime import Precision, resolve_precision
from pipelines.training import build_optimizer, train_step


def test_auto_is_fp32_on_the_cpu_and_a_named_precision_is_taken_as_asked():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (Precision("fp32", "cpu"), "fp32 on the CPU")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        precision, said = resolve_precision(name, cpu)
        assert precision.dtype == dtype and said.endswith("as asked")
        assert precision.scaler().is_enabled() == (name == "fp16")  # bf16 has fp32's range: no scaler
    with pytest.raises(BeitDataError, match=r"^`precision` must be one of auto, bf16, fp16, fp32, got 'fp8'$"):
        resolve_precision("fp8", cpu)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_the_forward_pass_runs_in_the_precision_and_the_weights_stay_float32(name):
    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).train()
    seen = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt, sched = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup=1,
                                 total=10)
    precision = Precision(name, "cpu")
    x, tokens = torch.rand(2, 3, 224, 224), torch.randint(0, 64, (2, 196))
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, :40] = True
    out = train_step(model, opt, sched, x.to(precision.dtype), tokens, mask, max_masked=75, clip_grad=3.0,
                     device=torch.device("cpu"), precision=precision, scaler=precision.scaler())
    assert seen == [precision.dtype] and torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_skips_a_step_whose_gradient_overflowed_and_halves_its_scale():
    """As timm's and unilm's fp16: an inf in the scaled gradient leaves the weights and the
    optimizer as they were and halves the scale; the next finite step updates them."""
    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64, drop_path_rate=0.0).train()
    opt, sched = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup=1,
                                 total=10)
    precision = Precision("fp16", "cpu")
    scaler = precision.scaler()
    x, tokens = torch.rand(2, 3, 224, 224), torch.randint(0, 64, (2, 196))
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, :40] = True
    step = dict(max_masked=75, clip_grad=3.0, device=torch.device("cpu"), precision=precision, scaler=scaler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    overflow = model.patch_embed.proj.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    train_step(model, opt, sched, x.half(), tokens, mask, **step)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**15 and not opt.state  # skipped: no AdamW moment was made
    overflow.remove()
    # The scale falls until the gradient fits fp16 (it starts at 2**16, too high on purpose), then
    # a step goes through.
    for skipped in range(1, 20):  # noqa: B007  (read after the loop)
        out = train_step(model, opt, sched, x.half(), tokens, mask, **step)
        if opt.state:
            break
    assert torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
    assert not torch.equal(before["patch_embed.proj.weight"], model.patch_embed.proj.weight)
    assert scaler.get_scale() == 2.0 ** (15 - skipped + 1) and scaler.state_dict()["_growth_tracker"] == 1
