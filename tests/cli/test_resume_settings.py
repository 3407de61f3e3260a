"""Resume with no flags: ``--resume`` alone takes every setting the run recorded, ``--resume auto``
starts or resumes, and ``--extend`` trains a run longer (issue 36, item 3)."""

import json

import pytest
from helpers import invoke, losses, records

from pipelines.training import lr_factor

# A run's flags, none of them pretrain's defaults.
FLAGS = ("--model", "beit_mim_tiny_patch16_224", "--batch-size", "2", "--grad-accum", "2", "--lr", "2e-3",
         "--min-lr", "1e-4", "--warmup-steps", "1", "--drop-path", "0", "--num-masked", "50", "--seed", "5",
         "--weight-decay", "0.01", "--clip-grad", "1", "--device", "cpu", "--num-threads", "1", "--log-every", "1",
         "--checkpoint-every", "100", "--quiet")


def pretrain(*args):
    result = invoke("pretrain", *args)
    assert result.exit_code == 0, result.output
    return result


def test_resume_auto_starts_or_resumes_and_resume_alone_continues_with_the_recorded_settings(sample_shards,
                                                                                              sample_tokens, tmp_path):
    data = ("--shards", sample_shards, "--tokens", sample_tokens)
    pretrain(*data, *FLAGS, "--steps", "4", "--out", tmp_path / "straight")
    # The requeued job's command, word for word: no run yet, one starts; then it resumes.
    requeued = (*data, *FLAGS, "--steps", "4", "--stop-after", "1", "--out", tmp_path / "run", "--resume", "auto")
    pretrain(*requeued)
    assert [r["step"] for r in records(tmp_path / "run")] == [1]
    pretrain(*requeued)
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
    missing = invoke("pretrain", "--out", tmp_path / "none", "--resume", "auto")
    assert missing.exit_code == 2 and "Missing option '--shards'" in missing.stderr
    resumed = pretrain("--out", tmp_path / "run", "--resume")  # nothing else: not even --quiet
    # Every setting is the recorded one, but what only this invocation does.
    assert "pretrain: resuming with stop_after 1 -> None, progress False -> True" in resumed.stderr.splitlines()
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # bit for bit
    # The job requeued once more, after the run ended: nothing is left to do, and that is no error.
    again = pretrain(*requeued)
    assert "pretrain: steps 4" in again.stdout and losses(tmp_path / "run") == losses(tmp_path / "straight")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["seed"], config["num_masked"], config["grad_accum"], config["lr"]) == (5, 50, 2, 2e-3)
    # A flag given again must agree, as before, or be one that only changes how the run goes.
    refused = invoke("pretrain", "--out", tmp_path / "run", "--resume", "--lr", "1e-3")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "Error: --lr is 0.002 in the run being resumed, not 0.001; a resumed run keeps it (start a new run to change "
        "it)")


def test_a_setting_recorded_without_its_credentials_must_be_given_again(sample_shards, sample_tokens, tmp_path):
    secret = f"pipe:env API_KEY=k3y-Secret cat {sample_shards}/sample-{{000000..000001}}.tar"
    pretrain("--shards", secret, "--tokens", sample_tokens, *FLAGS, "--steps", "2", "--stop-after", "1", "--out",
             tmp_path / "run")
    assert "k3y-Secret" not in (tmp_path / "run" / "config.json").read_text()
    refused = invoke("pretrain", "--out", tmp_path / "run", "--resume")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "Error: --shards is recorded without its credentials (pipe:env API_KEY=REDACTED cat "
        f"{sample_shards}/sample-{{000000..000001}}.tar); give it again")
    pretrain("--out", tmp_path / "run", "--resume", "--shards", secret)
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]


def test_extend_trains_a_finished_run_longer_with_the_cosine_recomputed(sample_shards, sample_tokens, tmp_path):
    data = ("--shards", sample_shards, "--tokens", sample_tokens)
    pretrain(*data, *FLAGS, "--steps", "3", "--out", tmp_path / "run")
    refused = invoke("pretrain", "--out", tmp_path / "run", "--resume", "--steps", "6")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "Error: --steps is 3 in the run being resumed, not 6; a resumed run keeps it (pass --extend to train it "
        "longer)")
    shorter = invoke("pretrain", "--out", tmp_path / "run", "--resume", "--extend", "--steps", "2")
    assert shorter.exit_code == 1 and "--extend: the run has trained 3 steps; give --steps" in shorter.stderr
    done = pretrain("--out", tmp_path / "run", "--resume", "--extend", "--steps", "6")
    assert "pretrain: extending the run to 6 steps; it has trained 3" in done.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows if r["event"] != "train"] == ["extended"]
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # Steps 1-3 followed the 3-step cosine; from step 4 on (the lr logged after step S is step S's
    # schedule value, index S), the 6-step one.
    for r in train[3:]:
        assert r["lr"] == pytest.approx(2e-3 * lr_factor(r["step"], 1, 6, 2e-3, 1e-4))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 6


def test_resume_alone_keeps_a_warmup_given_in_epochs(sample_shards, sample_tokens, tmp_path):
    """``config.json`` records the warmup steps a run came to as ``total_warmup_steps``, beside the
    settings as given, so that ``--resume`` alone takes ``warmup_steps`` back unset."""
    at = FLAGS.index("--warmup-steps")
    flags = FLAGS[:at] + FLAGS[at + 2:]
    pretrain("--shards", sample_shards, "--tokens", sample_tokens, *flags, "--warmup-epochs", "0.5", "--steps", "3",
             "--stop-after", "1", "--out", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["warmup_steps"], config["warmup_epochs"], config["total_warmup_steps"]) == (None, 0.5, 1)
    pretrain("--out", tmp_path / "run", "--resume")
    assert [r["step"] for r in records(tmp_path / "run") if r["event"] == "train"] == [1, 2, 3]


def test_a_config_json_from_before_total_warmup_steps_leaves_its_warmup_steps_out(tmp_path):
    """Before ``total_warmup_steps``, ``config.json`` held the steps the warmup came to under
    ``warmup_steps`` itself, which a resumed run leaves out: unset, as the checkpoint of a run
    warmed up by epochs holds it (a run given ``--warmup-steps`` is told to give it again)."""
    from beit_common import Location
    from pipelines.run_folder import recorded_settings

    (tmp_path / "config.json").write_text(json.dumps({"warmup_epochs": 10.0, "warmup_steps": 25, "betas": [0.9, 0.98]}))
    assert recorded_settings(Location(tmp_path)) == {"warmup_epochs": 10.0, "betas": (0.9, 0.98)}
    (tmp_path / "config.json").write_text(json.dumps({"warmup_steps": None, "total_warmup_steps": 25}))
    assert recorded_settings(Location(tmp_path)) == {"warmup_steps": None, "total_warmup_steps": 25}
