"""``--config FILE``: settings from YAML or JSON, flags over them; every run writes the
``config.yaml`` that reproduces it (issue 36, item 4)."""

import json

import yaml
from helpers import invoke, losses

FLAGS = ("--model", "beit_mim_tiny_patch16_224", "--batch-size", "2", "--lr", "2e-3", "--warmup-steps", "1",
         "--drop-path", "0", "--num-masked", "50", "--seed", "5", "--adam-betas", "0.9", "0.98", "--steps", "3",
         "--device", "cpu", "--num-threads", "1", "--log-every", "1", "--quiet")


def test_a_runs_config_yaml_given_back_reproduces_it_and_flags_override_it(sample_shards, sample_tokens, tmp_path):
    first = invoke("pretrain", "--shards", sample_shards, "--tokens", sample_tokens, *FLAGS, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert (written["seed"], written["betas"], written["num_masked"]) == (5, [0.9, 0.98], 50)
    assert not {"out", "resume", "stop_after", "progress"} & set(written)  # where and how one invocation ran
    again = invoke("pretrain", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b", "--quiet")
    assert again.exit_code == 0, again.output
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # the same run, bit for bit
    # JSON is read as well (a run's config.json too), and a flag on the command line wins over the file.
    other = invoke("pretrain", "-c", tmp_path / "a" / "config.json", "--out", tmp_path / "c", "--seed", "6",
                   "--quiet")
    assert other.exit_code == 0, other.output
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["seed"], config["lr"], config["num_masked"]) == (6, 2e-3, 50)


def test_a_config_file_with_an_unknown_setting_or_no_mapping_is_one_line(tmp_path):
    (tmp_path / "typo.yaml").write_text("batch_size: 8\nlearning_rate: 0.1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("steps: [1, 2\n")
    for name, message in (("typo", "pretrain has no setting learning_rate"),
                          ("list", "holds no mapping of setting names to values"), ("broken", "is not YAML or JSON")):
        result = invoke("pretrain", "--config", tmp_path / f"{name}.yaml", "--out", tmp_path / "r")
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "r").exists()


def test_tokenize_and_train_dvae_take_a_config_file_and_write_theirs(sample_shards, tiny_tokenizer, tmp_path):
    (tmp_path / "t.yaml").write_text(f"shards: {sample_shards}\ntokenizer: {tiny_tokenizer}\nviews: 2\ndevice: cpu\n")
    done = invoke("tokenize", "-c", tmp_path / "t.yaml", "--out", tmp_path / "tokens", "--quiet")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "tokens" / "summary.json").read_text())["views"] == 28  # 14 images x 2
    assert yaml.safe_load((tmp_path / "tokens" / "config.yaml").read_text())["views"] == 2
    (tmp_path / "d.yaml").write_text(f"shards: {sample_shards}\nsteps: 2\nbatch_size: 4\ndevice: cpu\n")
    dvae = invoke("train-dvae", "--config-file", tmp_path / "d.yaml", "--out", tmp_path / "d.pt", "--quiet")
    assert dvae.exit_code == 0, dvae.output
    assert yaml.safe_load((tmp_path / "d.pt.config.yaml").read_text())["steps"] == 2
