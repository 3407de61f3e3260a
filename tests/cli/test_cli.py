"""The command line: every option reaches its config setting, defaults are the configs', errors are flags."""

from __future__ import annotations

import dataclasses
import importlib

import click
import pytest
from helpers import invoke

import cli
from cli import NOT_SETTINGS, DeviceType, ResumeType, TrackersType
from pipelines.config import (
    ExportConfig,
    IndexConfig,
    InspectConfig,
    PlanConfig,
    PretrainConfig,
    ProbeConfig,
    Sectioned,
    ShardsConfig,
    TokenizeConfig,
    TrainDVAEConfig,
    default,
)
from pipelines.recipes import DVAE_CONFIGS

# Each command's config, and the stage function its command calls (where the config is caught).
COMMANDS = {"shards": (ShardsConfig, "pipelines.shards", "run_shards"),
            "index": (IndexConfig, "pipelines.index", "run_index"),
            "train-dvae": (TrainDVAEConfig, "pipelines.train_dvae", "run_train_dvae"),
            "tokenize": (TokenizeConfig, "pipelines.tokenize_shards", "run_tokenize"),
            "pretrain": (PretrainConfig, "pipelines.pretrain", "run_pretrain"),
            "plan": (PlanConfig, "pipelines.plan", "run_plan"),
            "probe": (ProbeConfig, "pipelines.probe", "run_probe"),
            "export": (ExportConfig, "pipelines.export", "run_export"),
            "inspect": (InspectConfig, "pipelines.inspect_tokens", "run_inspect")}


# Options that exclude another the test gives (checked with it off); plan's --global-batch sets
# --batch-size from the ranks (tests/cli/test_plan.py checks it).
# Options that exclude one given beside them (online targets exclude --tokens: tests/cli/test_online.py).
EXCLUSIVE = {("train-dvae", "overwrite"), ("plan", "global_batch"), ("pretrain", "targets"), ("pretrain", "tokenizer")}


class Caught(Exception):
    """Raised by a stage stand-in with the config it was given."""


def value_for(param: click.Parameter, tmp_path) -> tuple[list[str], object]:
    """Command-line words that set ``param`` to something other than its default, and the value
    the config should then hold."""
    if isinstance(param, click.Option) and param.is_flag:
        if param.secondary_opts:
            return [param.secondary_opts[0]], False
        return [param.opts[0]], param.flag_value if isinstance(param.flag_value, bool) else True
    kind = param.type
    if param.callback is not None:  # block numbers
        words = ["2,3"]
        expected = (2, 3)
    elif isinstance(kind, click.Tuple):  # floats (--opt-betas, --mean, --std)
        expected = (0.8, 0.95, 0.3)[:len(kind.types)]
        words = [str(x) for x in expected]
    elif isinstance(kind, DeviceType):
        words, expected = ["cuda:1"], "cuda:1"
    elif isinstance(kind, ResumeType):  # the config takes True, "auto" or False
        words, expected = ["auto"], "auto"
    elif isinstance(kind, TrackersType):  # a comma list, as a tuple of names
        words, expected = ["csv,mlflow"], ("csv", "mlflow")
    elif isinstance(kind, click.Choice):
        expected = next(c for c in kind.choices if c != param.default)
        words = [expected]
    elif isinstance(kind, click.types.IntParamType):
        expected = (param.default or 0) + 3
        words = [str(expected)]
    elif isinstance(kind, click.types.FloatParamType):
        expected = 0.5 if param.default != 0.5 else 0.25
        words = [str(expected)]
    elif not getattr(kind, "exists", False):  # a free string, or a path that need not exist yet
        expected = f"{param.name}-given"
        words = [expected]
    else:  # a path that exists, a file or a folder as the option wants
        path = tmp_path / f"{param.name}.json"
        if not kind.dir_okay:
            path.write_text('["a"]')
        else:
            path = tmp_path / param.name
            path.mkdir(exist_ok=True)
        expected = str(path)
        words = [expected]
    if isinstance(param, click.Argument):
        return words, (tuple(words) if param.nargs == -1 else expected)
    return [param.opts[0], *words], expected


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_reaches_its_config_setting(command, tmp_path, monkeypatch):
    config, module, function = COMMANDS[command]

    def caught(cfg):
        raise Caught(cfg)

    monkeypatch.setattr(importlib.import_module(module), function, caught)
    words, expected = [], {}
    for param in cli.main.commands[command].params:
        if param.name in NOT_SETTINGS or param.name == "help" or (command, param.name) in EXCLUSIVE:
            continue
        given, expected[param.name] = value_for(param, tmp_path)
        words += given
    result = invoke(command, *words)
    assert isinstance(result.exception, Caught), result.output
    cfg = result.exception.args[0]
    got = {name: cfg.setting(name) if isinstance(cfg, Sectioned) else getattr(cfg, name) for name in expected}
    assert got == expected


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_defaults_are_the_configs(command):
    config = COMMANDS[command][0]
    checked = 0
    for param in cli.main.commands[command].params:
        if isinstance(param, click.Option) and param.name not in NOT_SETTINGS and not param.required \
                and param.name != "help" and default(config, param.name) is not dataclasses.MISSING:
            given = param.default if not param.is_flag or isinstance(param.default, bool) else False
            assert given == default(config, param.name), (command, param.name)
            checked += 1
    assert checked >= 1


def test_dvae_config_names_match_the_models():
    from beit_model.dvae import CONFIGS as MODELS

    assert set(DVAE_CONFIGS) == set(MODELS)


def test_library_errors_name_settings_and_the_cli_names_flags(tmp_path):
    from beit_common import BeitDataError

    with pytest.raises(BeitDataError, match="^`batch_size` must be at least 1, got 0$"):
        TokenizeConfig(shards="s", tokenizer="t", out="o", batch_size=0)
    command = cli.main.commands["pretrain"]
    assert cli.as_flags("lower `batch_size`; pass `skip_missing` or `compile`, not `other`", command) == \
        "lower --batch-size; pass --skip-missing or --compile, not `other`"
    result = invoke("shards", "--min-size", "0", tmp_path, "--out", tmp_path / "o", "--prefix", "a/b")
    assert result.exit_code == 1 and "Error: --prefix must be a plain file-name prefix" in result.stderr
    rendered = invoke("inspect", tmp_path, "--render", "k")
    assert rendered.exit_code == 1 and "Error: --render needs --out (a .png file)" in rendered.stderr


