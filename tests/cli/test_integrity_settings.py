"""No silent no-op settings and no input that tracebacks (issue 33, items 2, 7 and 12).

Every numeric option of every command has a range checked when the command line is read
(walked from the click commands, so a new option without one fails here); ``--clip-grad 0`` is
no clipping; a partial or impossible rank environment is refused in one line; a resume on the CPU
gets back the thread count its run was saved with.
"""

from __future__ import annotations

import json
import os

import click
import pytest
import torch
from helpers import invoke, jpeg_bytes, write_tar
from hypothesis import given
from hypothesis import strategies as st

import cli
from beit_common import BeitDataError
from cli import Real
from pipelines.runtime import DistInfo, dist_info


def numeric_types(param: click.Parameter) -> list[click.ParamType]:
    """The numeric types a parameter takes its value(s) as (each element of a tuple option)."""
    kinds = param.type.types if isinstance(param.type, click.Tuple) else [param.type]
    return [t for t in kinds if isinstance(t, (click.types.IntParamType, click.types.FloatParamType))]


def numeric_options() -> list[tuple[str, click.Option]]:
    return [(name, param) for name, command in sorted(cli.main.commands.items()) for param in command.params
            if isinstance(param, click.Option) and numeric_types(param)]


def out_of_range(kind: click.ParamType) -> list[str]:
    """Values just outside a numeric type's range, and for floats the values that are no number."""
    if isinstance(kind, Real):
        values = ["nan", "-nan", "inf", "-inf"]
        if kind.min is not None:
            values.append(repr(kind.min) if kind.min_open else repr(kind.min - 1e-3 - abs(kind.min) * 1e-3))
        if kind.max is not None:
            values.append(repr(kind.max) if kind.max_open else repr(kind.max + 1e-3 + abs(kind.max) * 1e-3))
        return values
    return [str(bound) for bound in (kind.min is not None and kind.min - 1, kind.max is not None and kind.max + 1)
            if bound is not False]


def assert_refused_in_one_line(result, flag: str, *fragments: str) -> str:
    assert result.exit_code == 2, (flag, result.output)
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and flag in errors[0], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_every_numeric_option_of_every_command_has_a_range():
    options = numeric_options()
    assert {name for name, _ in options} >= {"pretrain", "tokenize", "train-dvae", "probe", "shards", "inspect",
                                             "plan", "sample"}
    unbounded = [f"{name} {param.opts[0]}" for name, param in options for kind in numeric_types(param)
                 if not isinstance(kind, (click.IntRange, Real)) or (kind.min, kind.max) == (None, None)]
    assert not unbounded, f"numeric options without a range (use click.IntRange or cli.Real): {unbounded}"


@pytest.mark.parametrize(("command", "option"), [(n, p) for n, p in numeric_options()],
                         ids=[f"{n} {p.opts[0]}" for n, p in numeric_options()])
def test_each_value_outside_an_options_range_is_refused_in_one_line_naming_it(command, option):
    flag = option.opts[0]
    kinds = numeric_types(option)
    for position, kind in enumerate(kinds):
        for bad in out_of_range(kind):
            values = [bad if i == position else str(option.default[i]) for i in range(len(kinds))] \
                if len(kinds) > 1 else [bad]
            result = invoke(command, flag, *values)
            assert_refused_in_one_line(result, flag)


@pytest.mark.parametrize(("args", "flag", "said"), [
    (("pretrain", "--clip-grad", "-1"), "--clip-grad", "x>=0"),
    (("pretrain", "--min-lr", "-1"), "--min-lr", "x>=0"),
    (("pretrain", "--weight-decay", "-5"), "--weight-decay", "x>=0"),
    (("pretrain", "--warmup-epochs", "-3"), "--warmup-epochs", "x>=0"),
    (("pretrain", "--num-masked", "500"), "--num-masked", "1<=x<=196"),
    (("pretrain", "--num-masked", "197"), "--num-masked", "1<=x<=196"),
    (("pretrain", "--adam-betas", "1.5", "0.999"), "--adam-betas", "0<=x<1"),
    (("pretrain", "--adam-betas", "0.9", "1.0"), "--adam-betas", "0<=x<1"),
    (("pretrain", "--drop-path", "1.5"), "--drop-path", "0<=x<1"),
    (("pretrain", "--lr", "nan"), "--lr", "not a finite number"),
    (("pretrain", "--lr", "0"), "--lr", "x>0"),
    (("pretrain", "--layer-scale", "inf"), "--layer-scale", "not a finite number"),
    (("pretrain", "--device", "tpu"), "--device", "not cpu, cuda, cuda:N or auto"),
    (("pretrain", "--device", "cuda:x"), "--device", "not cpu, cuda, cuda:N or auto"),
    (("pretrain", "--probe-layers", "0,4"), "--probe-layers", "start at 1"),
    (("pretrain", "--seed", "-1"), "--seed", "0<=x<="),
    (("train-dvae", "--lr", "-1"), "--lr", "x>0"),
    (("train-dvae", "--device", "tpu"), "--device", "'tpu'"),
    (("tokenize", "--device", "gpu"), "--device", "'gpu'"),
    (("probe", "--device", "cuda0"), "--device", "'cuda0'"),
    (("probe", "--temperature", "nan"), "--temperature", "not a finite number"),
    (("probe", "--layers", "-2"), "--layers", "start at 1"),
    (("tokenize", "--min-scale", "nan"), "--min-scale", "not a finite number"),
    (("shards", "--holdout-per-class", "nan"), "--holdout-per-class", "not a finite number"),
    (("shards", "--seed", str(2**64)), "--seed", "0<=x<="),
    (("inspect", "--max-dead-codes", "nan"), "--max-dead-codes", "not a finite number"),
])
def test_the_reported_bad_values_are_refused_in_one_line(args, flag, said):
    assert_refused_in_one_line(invoke(*args), flag, said)


def test_the_edges_of_each_range_are_taken():
    from cli import BETA, MAX_SEED, DeviceType

    assert Real(min=0).convert("0", None, None) == 0.0  # --clip-grad 0: no clipping
    assert BETA.convert("0", None, None) == 0.0 and BETA.convert("0.98", None, None) == 0.98
    assert click.IntRange(0, MAX_SEED).convert(str(MAX_SEED), None, None) == MAX_SEED
    assert [DeviceType().convert(d, None, None) for d in ("auto", "cpu", "cuda", "cuda:7")] == \
        ["auto", "cpu", "cuda", "cuda:7"]
    help_text = " ".join(invoke("pretrain", "--help").output.split())
    assert "0 turns clipping off" in help_text and "1<=x<=196" in help_text


def _tiny_step(clip_grad: float):
    """The parameters after one AdamW step of the tiny model at ``clip_grad``, and its norm."""
    from pipelines.training import build_model, build_optimizer, train_step

    torch.manual_seed(3)
    model = build_model("beit_mim_tiny_patch16_224", 64, drop_path=0.0)
    optimizer, scheduler = build_optimizer(model, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999),
                                           warmup=1, total=4)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 224, 224, generator=generator)  # (B, 3, 224, 224)
    tokens = torch.randint(0, 64, (2, 196), generator=generator)  # (B, 196)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, 20:50] = True
    out = train_step(model, optimizer, scheduler, images, tokens, mask, max_masked=30, clip_grad=clip_grad,
                     device=torch.device("cpu"))
    return [p.detach().clone() for p in model.parameters()], float(out.grad_norm)


def test_clip_grad_zero_is_no_clipping():
    free, free_norm = _tiny_step(1e9)  # a bound the gradient never reaches: no clipping
    off, off_norm = _tiny_step(0.0)
    clipped, _ = _tiny_step(1e-3)
    assert all(torch.equal(a, b) for a, b in zip(free, off))  # bitwise the unclipped step
    assert off_norm == pytest.approx(free_norm, rel=1e-6) and off_norm > 1e-3
    assert not all(torch.equal(a, b) for a, b in zip(free, clipped))  # the bound is still a bound


# The rank environment: (variables, the words of the refusal).
BAD_RANKS = [
    ({"RANK": "1"}, "WORLD_SIZE is not"),  # tokenize skipped shard 0, pretrain hung
    ({"WORLD_SIZE": "2"}, "RANK is not"),  # a torch traceback
    ({"LOCAL_RANK": "0"}, "RANK is not"),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK is 2, but WORLD_SIZE is 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_RANK is 5, but WORLD_SIZE is 2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK is '-1'"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE is '0'"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK is 'one'"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT is 'http'"),
    ({"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}, "SLURM_PROCID is 4, but "
                                                                                "SLURM_STEP_NUM_TASKS is 4"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "2"}, "SLURM_LOCALID is 2"),
    ({"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID is 'x'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "two"}, "SLURM_STEP_NUM_TASKS is 'two'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "j7"}, "SLURM_JOB_ID is 'j7'"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "LOCAL_RANK": "1"}, "RANK is not"),  # torchrun's, in part
]


@pytest.mark.parametrize(("environ", "said"), BAD_RANKS, ids=[" ".join(f"{k}={v}" for k, v in e.items())
                                                              for e, _ in BAD_RANKS])
def test_a_partial_or_impossible_rank_environment_is_refused_in_one_line(environ, said):
    with pytest.raises(BeitDataError, match=said) as refused:
        dist_info(environ)
    assert "\n" not in str(refused.value)


def test_a_whole_rank_environment_gives_the_place():
    assert dist_info({}) == DistInfo(0, 1, 0)
    assert dist_info({"RANK": "0", "WORLD_SIZE": "1"}) == DistInfo(0, 1, 0)
    assert dist_info({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}) == DistInfo(3, 4, 0)
    assert dist_info({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) \
        == DistInfo(5, 8, 1)
    slurm = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
             "SLURM_STEP_NODELIST": "n[4-6]"}
    assert dist_info(slurm) == DistInfo(2, 3, 0)
    # The batch script itself (no step), and a step of one task: one process, whatever the job's ids.
    assert dist_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "batch"}) == DistInfo()
    assert dist_info({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) == DistInfo()
    # torchrun inside an srun step: torchrun's variables win.
    assert dist_info({**slurm, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                      "MASTER_PORT": "2"}) == DistInfo(1, 2, 1)


NAMES = st.sampled_from(["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                         "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_ID"])
VALUES = st.one_of(st.integers(-3, 9).map(str), st.sampled_from(["", "x", "1.5", " 2", "99999999999999999999"]))


@given(st.dictionaries(NAMES, VALUES, max_size=7))
def test_any_rank_environment_gives_a_possible_place_or_one_line(environ):
    try:
        place = dist_info(environ)
    except BeitDataError as exc:
        assert "\n" not in str(exc) and any(name in str(exc) for name in environ)
        return
    assert 0 <= place.rank < place.world_size and 0 <= place.local_rank < place.world_size
    if place.world_size > 1:  # the ranks have somewhere to meet
        assert all(environ.get(n) for n in ("MASTER_ADDR", "MASTER_PORT")) or "SLURM_PROCID" in environ


@pytest.mark.parametrize("environ", [{"RANK": "1"}, {"WORLD_SIZE": "2"}])
def test_tokenize_under_a_partial_rank_environment_writes_nothing(environ, sample_shards, tiny_tokenizer, tmp_path,
                                                                  monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "tokens"
    result = invoke("tokenize", "--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--out", out,
                    "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and ("WORLD_SIZE" in result.output and "RANK" in result.output)
    assert not out.exists() or not any(out.iterdir())


def test_pretrain_under_a_partial_rank_environment_is_refused_before_it_starts(sample_shards, sample_tokens,
                                                                               tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    result = invoke("pretrain", "--shards", sample_shards, "--tokens", sample_tokens, "--out", tmp_path / "run",
                    "--model", "beit_mim_tiny_patch16_224", "--steps", "1", "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "RANK is set (1) but WORLD_SIZE is not" in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def tiny_encoder(folder) -> str:
    """A tiny encoder as ``beit-data export`` writes it (``enc.pth`` and ``enc.json``)."""
    import timm

    from beit_model.beit_mim import encoder_state_dict
    from pipelines.export import timm_args

    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()
    torch.save(encoder_state_dict(model), folder / "enc.pth")
    (folder / "enc.json").write_text(json.dumps({"timm_model": "beit_base_patch16_224", "timm_kwargs": {
        **timm_args({"embed_dim": 96, "depth": 4, "num_heads": 3}), "num_classes": 0}}))
    return str(folder / "enc.pth")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"timm_model": 7, "timm_kwargs": {}}',
                                  '{"timm_model": "beit_base_patch16_224"}', "\xff\xfe"])
def test_probe_refuses_a_malformed_export_json_naming_it(text, tmp_path):
    encoder = tiny_encoder(tmp_path)
    (tmp_path / "enc.json").write_bytes(text.encode("latin-1"))
    result = invoke("probe", encoder, "--train-shards", tmp_path / "t", "--val-shards", tmp_path / "v",
                    "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "enc.json is not the JSON `beit-data export` writes" in result.output


@pytest.mark.parametrize(("label", "class_map", "said"), [
    ("-1", None, "has class -1; class ids are 0 or more"),
    ("-1", ["a", "b", "c"], "has class -1; class ids are 0 to 2"),
    ("99999", ["cat", "dog"], "has class 99999; class ids are 0 to 1, the 2 classes of"),
    ("3", ["a", "b", "c"], "has class 3; class ids are 0 to 2, the 3 classes of"),
])
def test_probe_refuses_class_ids_outside_the_class_map_naming_the_sample(label, class_map, said, tmp_path):
    encoder = tiny_encoder(tmp_path)
    shards = tmp_path / "labeled"
    shards.mkdir()
    write_tar(shards / "p-000000.tar", [("k0.jpg", jpeg_bytes((40, 40), seed=1)), ("k0.cls", b"0"),
                                        ("k1.jpg", jpeg_bytes((40, 40), seed=2)), ("k1.cls", label.encode())])
    if class_map is not None:
        (shards / "shards.json").write_text(json.dumps({"shuffle": True, "seed": 0, "images": 2,
                                                        "shards": ["p-000000.tar"], "classes": class_map}))
    result = invoke("probe", encoder, "--train-shards", shards, "--val-shards", shards, "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "p-000000.tar: sample k1 " + said in result.output
    if class_map is not None:
        assert str(shards / "shards.json") in result.output


def test_a_resume_on_the_cpu_takes_the_thread_count_the_run_was_saved_with(capsys):
    from pipelines.checkpoint import RNGState

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        part = RNGState(torch.device("cpu"))
        state = part.state_dict()
        assert state["threads"] == [1]
        torch.set_num_threads(2)
        part.load_state_dict(state)
        assert torch.get_num_threads() == 1
        said = capsys.readouterr().err.strip().splitlines()
        assert said == ["pretrain: torch's CPU threads set to 1, as the run was saved with (this process had 2), "
                        "to resume bitwise"]
        part.load_state_dict(state)  # the same count: nothing to say
        assert capsys.readouterr().err == ""
        old = {k: v for k, v in state.items() if k != "threads"}  # a checkpoint from before the count
        part.load_state_dict(old)
        said = capsys.readouterr().err.strip().splitlines()
        assert len(said) == 1 and "does not record torch's CPU thread count" in said[0]
        assert torch.get_num_threads() == 1
        # Each rank takes its own count back; a GPU run keeps its threads (its arithmetic is on the GPU).
        RNGState(torch.device("cpu"), rank=1, world_size=2).load_state_dict({**state, "threads": [1, 2]})
        assert torch.get_num_threads() == 2 and capsys.readouterr().err == ""
        RNGState(torch.device("meta")).load_state_dict({**state, "threads": [1]})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_resume_in_another_mkl_mode_says_its_losses_differ_and_how_to_match(capsys):
    from pipelines.checkpoint import RNGState

    part = RNGState(torch.device("cpu"))
    state = part.state_dict()
    assert state["mkl_cbwr"] == os.environ["MKL_CBWR"] == "AUTO"  # the command's default (cli.py)
    part.load_state_dict(state)
    assert capsys.readouterr().err == ""
    part.load_state_dict({**state, "mkl_cbwr": "COMPATIBLE"})
    assert capsys.readouterr().err.splitlines() == [
        "pretrain: the run was saved with MKL_CBWR=COMPATIBLE and this process has MKL_CBWR=AUTO: the losses will "
        "differ bitwise from an uninterrupted run's; export MKL_CBWR=COMPATIBLE before the command to resume bitwise"]
    # A checkpoint from before the record, and a GPU run (its arithmetic is not MKL's), say nothing.
    part.load_state_dict({k: v for k, v in state.items() if k != "mkl_cbwr"})
    RNGState(torch.device("meta")).load_state_dict({**state, "mkl_cbwr": "COMPATIBLE"})
    assert capsys.readouterr().err == ""
