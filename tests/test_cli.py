"""The command line takes its defaults from the stage configs and speaks in flags."""

import dataclasses

import pytest

import cli
from pipelines.config import DVAE_CONFIGS, InspectConfig, PretrainConfig, ShardsConfig, TokenizeConfig, TrainDVAEConfig

CONFIGS = {"shards": ShardsConfig, "train-dvae": TrainDVAEConfig, "tokenize": TokenizeConfig,
           "pretrain": PretrainConfig, "inspect": InspectConfig}
RENAMED = {"compile_": "compile"}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_are_the_configs(command):
    config = CONFIGS[command]
    fields = {f.name: f for f in dataclasses.fields(config)}
    checked = 0
    for param in cli.main.commands[command].params:
        name = RENAMED.get(param.name, param.name)
        plain_flag = getattr(param, "is_flag", False) and not param.secondary_opts  # off unless given
        if name in fields and fields[name].default is not dataclasses.MISSING and not (param.required or plain_flag):
            assert param.default == fields[name].default, (command, name)
            checked += 1
    assert checked >= 2


def test_dvae_config_names_match_the_models():
    from beit_model.dvae import CONFIGS as MODELS

    assert set(DVAE_CONFIGS) == set(MODELS)


def test_library_errors_name_settings_and_the_cli_names_flags(tmp_path):
    from beit_common import BeitDataError
    from tests.conftest import run_cli

    with pytest.raises(BeitDataError, match="^`batch_size` must be at least 1, got 0$"):
        TokenizeConfig(shards="s", tokenizer="t", out="o", batch_size=0)
    command = cli.main.commands["pretrain"]
    assert cli.as_flags("lower `batch_size`; pass `skip_missing` or `compile`, not `other`", command) == \
        "lower --batch-size; pass --skip-missing or --compile, not `other`"
    result = run_cli("shards", str(tmp_path), "--out", str(tmp_path / "o"), "--prefix", "a/b")
    assert result.returncode != 0 and "Error: --prefix must be a plain file-name prefix" in result.stderr


@pytest.mark.parametrize("command", ["tokenize", "pretrain", "train-dvae"])
def test_without_dali_the_commands_name_the_extras(tmp_path, command):
    import subprocess
    import sys

    from tests.conftest import REPO

    args = {"tokenize": ["--tokenizer", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o")],
            "pretrain": ["--tokens", str(tmp_path), "--out", str(tmp_path / "o")],
            "train-dvae": ["--out", str(tmp_path / "d.pt")]}[command]
    code = ("import sys; sys.modules['nvidia.dali'] = None; import cli; "
            f"cli.main([{command!r}, '--shards', {str(tmp_path)!r}, *{args!r}], prog_name='beit-data')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "NVIDIA DALI is not installed" in result.stderr
    assert "beit-data[cuda13]" in result.stderr and "beit-data[cuda12]" in result.stderr


def test_the_command_sets_mkl_reproducible_mode_before_torch_loads():
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import sys, os, cli; print(os.environ['MKL_CBWR'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["COMPATIBLE", "False"], done.stderr


def test_settings_named_in_errors_print_as_flags(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("inspect", str(tmp_path), "--render", "k")
    assert result.returncode != 0 and "Error: --render needs --out (a .png file)" in result.stderr
