"""pretrain's optimizer, schedule and input normalisation (issue 36, item 6): through timm's
factories, the defaults keep every learning rate of the runs before them bit for bit, a checkpoint
of the old ``LambdaLR`` resumes into the new schedule, and another ``opt`` or ``sched`` is what
timm makes of it; ``mean`` and ``std`` normalise the model's views."""

import warnings
from dataclasses import replace

import pytest
import torch
from helpers import jpeg_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.scheduler.step_lr import StepLRScheduler

from beit_common import BeitDataError
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD, StreamConfig
from pipelines.training import WarmupCosine, build_optimizer, check_optimizer, lr_factor, param_groups


class Tiny(torch.nn.Module):
    """Two parameters that decay and two that do not, one of them by ``no_weight_decay``."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(3))
        self.table, self.token = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(1, 1, 2))

    def no_weight_decay(self):
        return {"token"}


def old_schedule(model, lr, min_lr, warmup, total):
    """What every run before timm's factories built: AdamW over ``param_groups`` and a LambdaLR."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.999))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, lr, min_lr))


def lrs(optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def step_old(optimizer, scheduler):
    optimizer.step()  # no gradients: it moves nothing, and torch does not warn of the order
    scheduler.step()


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 400), share=st.floats(0, 1), lr=st.floats(1e-7, 1.0), min_lr=st.floats(0, 1e-2))
def test_the_default_schedule_is_the_old_one_at_every_step_bit_for_bit(total, share, lr, min_lr):
    warmup = max(1, round(share * total))  # as the trainer has it: 1 to total
    old_opt, old = old_schedule(Tiny(), lr, min_lr, warmup, total)
    optimizer, schedule = build_optimizer(Tiny(), lr=lr, min_lr=min_lr, weight_decay=0.05, betas=(0.9, 0.999),
                                          warmup=warmup, total=total)
    assert type(optimizer) is torch.optim.AdamW and type(schedule.scheduler) is WarmupCosine
    for step in range(total + 3):  # past the end too, where an extended run's old schedule stood
        assert lrs(optimizer) == lrs(old_opt) == [lr * lr_factor(step, warmup, total, lr, min_lr)] * 2, step
        step_old(old_opt, old)
        schedule.step()


def test_the_default_optimizer_is_the_old_adamw_with_the_same_groups():
    model = Tiny()
    optimizer, _ = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup=2,
                                   total=10)
    old_opt, _ = old_schedule(model, 1e-3, 1e-5, 2, 10)
    ignore = ("lr", "initial_lr", "betas")  # the schedule's, and the betas given here
    assert [{k: v for k, v in g.items() if k not in ignore} for g in optimizer.param_groups] == \
           [{k: v for k, v in g.items() if k not in ignore} for g in old_opt.param_groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98) and optimizer.param_groups[0]["eps"] == 1e-8


@settings(max_examples=15, deadline=None)
@given(total=st.integers(2, 60), at=st.floats(0, 1), warmup=st.integers(1, 10))
def test_an_old_lambdalr_checkpoint_resumes_into_the_schedule(total, at, warmup):
    """A checkpoint's optimizer and ``LambdaLR`` states, taken into a fresh optimizer and schedule,
    go on with the learning rates the old run would have had."""
    warmup, stop = min(warmup, total), round(at * total)
    old_opt, old = old_schedule(Tiny(), 2e-3, 1e-4, warmup, total)
    for _ in range(stop):
        step_old(old_opt, old)
    saved = {"optimizer": old_opt.state_dict(), "scheduler": old.state_dict()}
    optimizer, schedule = build_optimizer(Tiny(), lr=2e-3, min_lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999),
                                          warmup=warmup, total=total)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    assert schedule.steps == stop
    for _ in range(total - stop + 2):
        assert lrs(optimizer) == lrs(old_opt)
        step_old(old_opt, old)
        schedule.step()


def test_another_opt_and_sched_are_timms_with_the_same_groups():
    optimizer, schedule = build_optimizer(Tiny(), opt="sgd", sched="step", lr=1.0, min_lr=1e-5, weight_decay=0.05,
                                          betas=(0.9, 0.999), momentum=0.8, warmup=2, total=10, decay_steps=3,
                                          decay_rate=0.5)
    assert type(optimizer) is torch.optim.SGD and type(schedule.scheduler) is StepLRScheduler
    assert [(g["momentum"], g["nesterov"], g["weight_decay"]) for g in optimizer.param_groups] == \
           [(0.8, True, 0.05), (0.8, True, 0.0)]
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]  # weight, table | bias, token
    seen = []
    for _ in range(8):
        seen.append(lrs(optimizer)[0])
        schedule.step()
    # timm's step schedule in optimizer steps: a linear warmup from 0 over 2 steps, then halved every 3
    assert seen == [0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    state = schedule.state_dict()
    _, again = build_optimizer(Tiny(), opt="sgd", sched="step", lr=1.0, min_lr=1e-5, weight_decay=0.05,
                               betas=(0.9, 0.999), warmup=2, total=10, decay_steps=3, decay_rate=0.5)
    again.load_state_dict(state)
    assert again.steps == 8 and lrs(again.scheduler.optimizer) == [0.25, 0.25]


def test_sched_none_keeps_the_learning_rate():
    optimizer, schedule = build_optimizer(Tiny(), sched="none", lr=0.3, min_lr=0.0, weight_decay=0.05,
                                          betas=(0.9, 0.999), warmup=5, total=10)
    for _ in range(3):
        assert lrs(optimizer) == [0.3, 0.3]
        schedule.step()


def test_an_unknown_optimizer_is_one_line_naming_it():
    with pytest.raises(BeitDataError) as caught:
        check_optimizer("adamww")
    assert str(caught.value) == ("`opt` 'adamww' is not an optimizer timm makes: Optimizer adamww not found in "
                                 "registry; did you mean adamw?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known name builds quietly
        check_optimizer("lookahead_adamw")



# ---- the model input's normalisation: --mean / --std ----


def test_the_model_views_are_normalised_with_the_runs_mean_and_std():
    """The stream's view (``model_view_spec``, which the held-out set shares) is the [0,1] view
    less ``mean``, over ``std``, channel by channel, in float16."""
    from beit_data.dali_views import UNIT_RANGE, DaliViews
    from beit_data.stream import model_view_spec
    from beit_data.tokens import TokenizerMeta, TokenMeta
    from beit_data.views import View, ViewRecipe

    image = jpeg_bytes((80, 60))
    meta = TokenMeta(tokenizer=TokenizerMeta(fingerprint="", grid=14, input_size=112, name="dvae", vocab=64),
                     views=ViewRecipe())
    views = [[View(5, 5, 60, 50, True, 1.2, 0.9, 1.1)]]
    plain = replace(model_view_spec(meta, 32), mean=UNIT_RANGE[0], std=UNIT_RANGE[1], half=False)
    unit = DaliViews(plain, batch_size=1)([image], views)[0, 0]  # (3, 32, 32) in [0, 1]
    assert model_view_spec(meta, 32).mean == IMAGENET_MEAN and model_view_spec(meta, 32).std == IMAGENET_STD
    for mean, std in (((0.5,) * 3, (0.5,) * 3), ((0.1, 0.6, 0.3), (0.9, 0.5, 0.25))):
        spec = model_view_spec(meta, 32, mean=mean, std=std)
        got = DaliViews(spec, batch_size=1)([image], views)[0, 0]
        assert got.dtype == torch.float16
        want = (unit - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        assert torch.allclose(got.float(), want, atol=1e-2), (mean, std)


@pytest.mark.parametrize("mean, std, error", [
    ((0.5, 0.5), IMAGENET_STD, "`mean` must be 3 numbers in [0, 1], one per RGB channel, got (0.5, 0.5)"),
    ((0.5, 0.5, 1.5), IMAGENET_STD, "`mean` must be 3 numbers in [0, 1], one per RGB channel, got (0.5, 0.5, 1.5)"),
    (IMAGENET_MEAN, (0.5, 0.0, 0.5), "`std` must be 3 positive numbers, one per RGB channel, got (0.5, 0.0, 0.5)"),
    (IMAGENET_MEAN, "0.5", "`std` must be 3 positive numbers, one per RGB channel, got '0.5'"),
    (IMAGENET_MEAN, (float("nan"),) * 3, "`std` must be 3 positive numbers, one per RGB channel, got (nan, nan, nan)"),
])
def test_a_normalisation_that_is_not_three_numbers_per_channel_is_refused(mean, std, error):
    with pytest.raises(BeitDataError) as caught:
        StreamConfig(shards="s", tokens="t", mean=mean, std=std)
    assert str(caught.value) == error


def test_a_recorded_normalisation_reads_back_as_the_tuples_it_was():
    config = StreamConfig(shards="s", tokens="t", mean=[0.5, 0.5, 0.5], std=[1, 1, 1])  # as config.json holds them
    assert (config.mean, config.std) == ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
