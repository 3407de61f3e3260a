"""pretrain's ``--opt``/``--sched`` (timm's factories) and ``--mean``/``--std`` end to end: what a run
records, resumes, exports and refuses (issue 36, item 6)."""

import json

import torch
import yaml
from helpers import invoke, losses, records

FLAGS = ("--model", "beit_mim_tiny_patch16_224", "--batch-size", "4", "--lr", "1e-3", "--steps", "3",
         "--device", "cpu", "--num-threads", "1", "--log-every", "1", "--quiet")
# SGD with a step schedule: no warmup, the learning rate halved every step (3 steps an epoch, 0.3 of one).
SGD_STEP = {"opt": "sgd", "momentum": 0.8, "sched": "step", "warmup_steps": 0, "decay_epochs": 0.3, "decay_rate": 0.5}
HALF = ("0.5", "0.5", "0.5")  # unilm's mean and std without --imagenet_default_mean_and_std


def pretrain(*args):
    result = invoke("pretrain", *args)
    assert result.exit_code == 0, result.output
    return result


def test_a_run_of_sgd_a_step_schedule_and_mean_half_is_recorded_exported_and_resumed_bit_for_bit(
        sample_shards, sample_tokens, tmp_path):
    import timm
    from timm.data import resolve_data_config

    from beit_common import Location
    from beit_data.stream import TrainStream
    from beit_data.stream_config import StreamConfig
    from pipelines.probe import load_encoder

    data = ("--shards", sample_shards, "--tokens", sample_tokens)
    flags = ("--opt", "sgd", "--momentum", "0.8", "--sched", "step", "--warmup-steps", "0", "--decay-epochs", "0.3",
             "--decay-rate", "0.5", "--mean", *HALF, "--std", *HALF)
    straight = pretrain(*data, *FLAGS, *flags, "--out", tmp_path / "straight")
    assert [line for line in straight.stderr.splitlines() if "warning" in line] == [
        "pretrain: warning: the model's input is normalised with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5), not "
        "with the (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225) of the beit recipe the tokens were made for; the "
        "export records yours, so fine-tune with them"]
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    written = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert {k: config[k] for k in SGD_STEP} == {k: written[k] for k in SGD_STEP} == SGD_STEP
    assert config["mean"] == config["std"] == written["mean"] == written["std"] == [0.5, 0.5, 0.5]
    assert config["steps_per_epoch"] == 3
    # The lr logged after step S is step S's (index S): 1e-3 at step 0, halved at each step after it,
    # where the default (AdamW, BEiT's cosine) would warm up for a step and then decay.
    assert [r["lr"] for r in records(tmp_path / "straight") if r["event"] == "train"] == [5e-4, 2.5e-4, 1.25e-4]
    ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert ckpt["scheduler"] == {"steps": 3} and ckpt["optimizer"]["param_groups"][0]["nesterov"] is True
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["optimizer"]["state"].values())  # SGD's, not AdamW's
    # The stream of these settings normalises with them; the probe and the export read them from the run.
    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), mean=config["mean"],
                                      std=config["std"]))
    assert (stream.spec.mean, stream.spec.std) == ((0.5,) * 3, (0.5,) * 3)
    assert load_encoder(Location(tmp_path / "straight"))[0].pretrained_cfg == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    exported = invoke("export", tmp_path / "straight", "--out", tmp_path / "enc")
    assert exported.exit_code == 0, exported.output
    encoder = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True, num_classes=0)
    assert tuple(resolve_data_config({}, model=encoder)["std"]) == (0.5, 0.5, 0.5)  # what timm fine-tunes with
    # The same settings from a config file, stopped after a step, resumed with no flags: the same run.
    (tmp_path / "sgd.yaml").write_text(yaml.safe_dump({**SGD_STEP, "mean": [0.5] * 3, "std": [0.5] * 3}))
    pretrain(*data, *FLAGS, "-c", tmp_path / "sgd.yaml", "--stop-after", "1", "--out", tmp_path / "run")
    pretrain("--out", tmp_path / "run", "--resume", "--quiet")
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # bit for bit
    assert [r["lr"] for r in records(tmp_path / "run") if r["event"] == "train"] == [5e-4, 2.5e-4, 1.25e-4]
    # Another optimizer is another run: refused, as any setting that changes what the run computes.
    refused = invoke("pretrain", "--out", tmp_path / "run", "--resume", "--opt", "adamw")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "Error: --opt is 'sgd' in the run being resumed, not 'adamw'; a resumed run keeps it (start a new run to "
        "change it)")


def test_bad_optimizer_schedule_and_normalisation_settings_are_one_line(sample_shards, sample_tokens, tmp_path):
    data = ("--shards", sample_shards, "--tokens", sample_tokens, *FLAGS)
    for args, code, message in (
            (("--opt", "adamww"), 1, "Error: --opt 'adamww' is not an optimizer timm makes: Optimizer adamww not "
                                     "found in registry; did you mean adamw?"),
            (("--sched", "cosin"), 2, "Error: Invalid value for '--sched': 'cosin' is not one of 'cosine', 'step', "
                                      "'tanh', 'poly', 'constant', 'none'."),
            (("--std", "0.5", "0", "0.5"), 2, "Error: Invalid value for '--std': 0.0 is not in the range x>0."),
            (("--mean", "0.5", "0.5"), 2, "Error: Option '--mean' requires 3 arguments.")):
        result = invoke("pretrain", *data, "--out", tmp_path / "run", *args)
        assert result.exit_code == code and result.stderr.strip().splitlines()[-1] == message, result.output
        assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    (tmp_path / "two.yaml").write_text("mean: [0.5, 0.5]\n")  # a config file's values are the flags' values
    result = invoke("pretrain", *data, "-c", tmp_path / "two.yaml", "--out", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--mean': 3 values are required, but 2 were given.")
