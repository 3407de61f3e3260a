"""Quality signals: the held-out masked-token figures of pretrain, the k-NN probe during
training, and ``beit-data probe`` on run folders and exported encoders."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import run_cli

from beit_common import BeitDataError, Location
from pipelines.pretrain import PretrainConfig, run_pretrain

TINY = dict(model="beit_mim_tiny_patch16_224", batch_size=4, warmup_steps=2, lr=1e-3, log_every=1, device="cpu",
            progress=False, num_threads=1, steps=4, checkpoint_every=100)


def records(run, event=None):
    """The log's rows of ``event`` (the training steps' by default), without their wall-clock time."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(isinstance(r.pop("time"), float) and "event" in r for r in rows)  # every row has both
    return [r for r in rows if r["event"] == (event or "train")]


def test_held_out_figures_are_fixed_and_leave_training_alone(sample_shards, sample_tokens, labeled_shards, tmp_path):
    # Training reads the first sample shard; the second (same shards run, other keys) is held out.
    common = dict(shards=str(sample_shards / "sample-000000.tar"), tokens=str(sample_tokens), **TINY)
    checks = dict(val_shards=str(sample_shards / "sample-000001.tar"), val_tokens=str(sample_tokens), val_every=2,
                  probe_every=4, probe_train=str(labeled_shards / "train"), probe_val=str(labeled_shards / "val"),
                  probe_layers=(3, 4))
    plain = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "plain"), **common))
    straight = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common, **checks))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=2, **common, **checks))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **common, **checks))
    # Validating and probing change nothing in the training, bit for bit.
    losses = [[r["loss"] for r in records(tmp_path / n)] for n in ("plain", "straight", "resumed")]
    assert len(losses[0]) == 4 and losses[0] == losses[1] == losses[2]
    assert plain.holdout == [] and [r["step"] for r in straight.holdout] == [0, 4]
    # The same set, views and masks at every evaluation: two runs, and a resumed one, agree exactly.
    val = records(tmp_path / "straight", "val")
    assert [r["step"] for r in val] == [0, 2, 4] and val == records(tmp_path / "resumed", "val")
    for r in val:
        assert r["val_images"] == 6 and 0 <= r["val_top1"] <= r["val_top5"] <= 1 and 0 < r["val_majority"] <= 1
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # the tiny dVAE's targets are learnable
    probes = records(tmp_path / "straight", "probe")
    assert [r["step"] for r in probes] == [0, 4] and probes == records(tmp_path / "resumed", "probe")
    assert all(r["probe_top1"] > 0.5 for r in probes)  # three visibly different classes; chance is 1/3
    assert (tmp_path / "straight" / "tb").is_dir()
    # beit-data probe on the run folder, with --linear and two blocks averaged.
    done = run_cli("probe", str(tmp_path / "straight"), "--train-shards", str(labeled_shards / "train"),
                   "--val-shards", str(labeled_shards / "val"), "--layers", "3,4", "--linear", "--json", "--quiet",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["kind"], result["layers"], result["train_images"], result["val_images"]) == ("run", [3, 4], 30, 18)
    assert result["knn"]["top1"] > 0.6 and result["linear"]["top1"] > 0.6


def test_held_out_images_that_training_reads_are_refused(sample_shards, sample_tokens, tmp_path):
    common = dict(shards=str(sample_shards / "sample-000000.tar"), tokens=str(sample_tokens), **TINY)
    with pytest.raises(BeitDataError, match="validation shard .*sample-000000.tar is also a training shard"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "a"),
                                              val_shards=str(sample_shards / "sample-000000.tar"),
                                    val_tokens=str(sample_tokens), **common))
    # A copy under another name in the same shards folder: the same keys are the same samples.
    for name in ("sample-000000.tar", "sample-000000.idx"):
        shutil.copy(sample_shards / name, tmp_path / name)
        shutil.copy(sample_shards / name, tmp_path / name.replace("sample", "copy"))
    shutil.copytree(sample_tokens, tmp_path / "tokens")
    shutil.copy(tmp_path / "tokens" / "sample-000000.parquet", tmp_path / "tokens" / "copy-000000.parquet")
    with pytest.raises(BeitDataError, match="validation sample copy-000000.tar:0000000.. is also a training sample"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "b"), shards=str(tmp_path / "sample-000000.tar"),
                                    tokens=str(tmp_path / "tokens"), val_shards=str(tmp_path / "copy-000000.tar"),
                                    val_tokens=str(tmp_path / "tokens"), **TINY))
    with pytest.raises(BeitDataError, match=r"`probe_layers` must be block numbers from 1 to 4, got \[9\]"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "d"), probe_every=2, probe_train=str(sample_shards),
                                    probe_val=str(sample_shards), probe_layers=(9,), **common))
    with pytest.raises(BeitDataError, match="has no token file"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "c"), val_shards=str(tmp_path / "copy-000000.tar"),
                                    val_tokens=str(sample_tokens), **common))
    assert not any((tmp_path / n).exists() for n in "abd")  # nothing half-made is left


def test_the_probe_sees_visible_classes_and_not_shuffled_labels(labeled_shards, sample_shards, tmp_path):
    import timm

    from beit_model.beit_mim import encoder_state_dict
    from pipelines.evaluation import knn, labeled_features
    from pipelines.export import timm_args
    from pipelines.probe import ProbeConfig, format_probe, run_probe

    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()
    torch.save(encoder_state_dict(model), tmp_path / "enc.pth")
    args = timm_args({"embed_dim": 96, "depth": 4, "num_heads": 3})
    (tmp_path / "enc.json").write_text(json.dumps({"timm_model": "beit_base_patch16_224",
                                                   "timm_kwargs": {**args, "num_classes": 0}}))
    result = run_probe(ProbeConfig(model=str(tmp_path / "enc.pth"), train_shards=str(labeled_shards / "train"),
                                   val_shards=str(labeled_shards / "val"), linear=True, device="cpu", progress=False))
    assert result["kind"] == "encoder" and result["chance_top1"] == pytest.approx(1 / 3)
    assert result["knn"]["top1"] >= 0.9 and result["linear"]["top1"] >= 0.9
    table = format_probe(result).splitlines()
    assert table[2].startswith("k-NN          top-1") and table[3].startswith("linear        top-1")
    assert f"{100 * result['knn']['top1']:5.1f}%" in table[2]
    # The same features with the training labels shuffled: near chance.
    (train, labels, _), (val, val_labels, _) = (
        labeled_features(model, str(labeled_shards / p), [4], torch.device("cpu")) for p in ("train", "val"))
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert knn(train, labels, val, val_labels)["top1"] >= 0.9
    assert knn(train, shuffled, val, val_labels)["top1"] < 0.55
    unlabeled = run_cli("probe", str(tmp_path / "enc.pth"), "--train-shards", str(sample_shards),
                        "--val-shards", str(labeled_shards / "val"), "--device", "cpu", "--quiet")
    assert unlabeled.returncode != 0 and "Traceback" not in unlabeled.stderr
    assert "has no .cls member" in unlabeled.stderr and len(unlabeled.stderr.strip().splitlines()) == 1


def test_the_probe_refuses_sets_whose_class_ids_mean_other_classes(tmp_path):
    import timm
    from helpers import class_tree

    from beit_model.beit_mim import encoder_state_dict
    from pipelines.export import timm_args
    from pipelines.probe import ProbeConfig, run_probe
    from pipelines.shards import ShardsConfig, run_shards

    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()
    torch.save(encoder_state_dict(model), tmp_path / "enc.pth")
    (tmp_path / "enc.json").write_text(json.dumps({"timm_model": "beit_base_patch16_224", "timm_kwargs": {
        **timm_args({"embed_dim": 96, "depth": 4, "num_heads": 3}), "num_classes": 0}}))
    run_shards(ShardsConfig(min_size=0,
                            sources=[class_tree(tmp_path / "train", {"cat": 2, "dog": 2})], out=tmp_path / "t",
                            progress=False))
    val = class_tree(tmp_path / "val", {"bird": 1, "dog": 1})  # dog is 1 in train, and 1 here only by chance
    run_shards(ShardsConfig(min_size=0, sources=[val], out=tmp_path / "v", progress=False))

    def probe(val_shards):
        return run_probe(ProbeConfig(model=str(tmp_path / "enc.pth"), train_shards=str(tmp_path / "t"),
                                     val_shards=str(val_shards), k=2, device="cpu", progress=False))

    with pytest.raises(BeitDataError, match=r"the train shards \(.*\) and the val shards \(.*\) were written with "
                                            r"different class maps .*; write both with one class map"):
        probe(tmp_path / "v")
    (val / "bird").rename(tmp_path / "bird")
    run_shards(ShardsConfig(min_size=0, sources=[val], out=tmp_path / "v2", classes=tmp_path / "t" / "shards.json",
                            progress=False))
    assert probe(tmp_path / "v2")["val_images"] == 1


def test_held_out_top1_is_printed_beside_the_most_common_code_and_warned_when_no_better(sample_shards, sample_tokens,
                                                                                         tmp_path):
    """``val_majority`` is the top-1 of always predicting the most common held-out target; pretrain
    prints it beside the top-1, and warns in one line when the top-1 does not beat it."""
    from helpers import evaluate_untrained, invoke

    from beit_data.holdout import load_holdout
    from beit_data.tokens import read_meta, token_files
    from beit_model.beit_mim import masked_positions

    val = sample_shards / "sample-000001.tar"
    figures = evaluate_untrained(sample_tokens, val, sample_tokens, count=6)
    held = load_holdout(str(val), Location(sample_tokens), count=6, seed=0,
                        meta=read_meta(token_files(Location(sample_tokens))[0]),
                        image_size=224, num_masked=75)
    positions, real = masked_positions(held.mask, 75)
    targets = held.tokens.gather(1, positions)[real].numpy()
    assert figures["val_majority"] == pytest.approx(np.bincount(targets).max() / len(targets))

    result = invoke("pretrain", "--shards", sample_shards / "sample-000000.tar", "--tokens", sample_tokens,
                    "--out", tmp_path / "run", "--val-shards", val, "--val-tokens", sample_tokens, "--val-images", "6",
                    "--model", "beit_mim_tiny_patch16_224", "--batch-size", "4", "--steps", "2", "--warmup-steps",
                    "1", "--device", "cpu", "--num-threads", "1", "--quiet")
    assert result.exit_code == 0, result.output
    last = records(tmp_path / "run", "val")[-1]
    assert f"always predicting the most common code: top-1 {100 * last['val_majority']:.1f}%" in result.stdout
    # Each measurement is also a line when it is made, at steps 0 and 2.
    measured = [line for line in result.stderr.splitlines() if line.startswith("pretrain: held-out at step")]
    assert [line.split(":")[1] for line in measured] == [" held-out at step 0", " held-out at step 2"]
    assert measured[-1] == (f"pretrain: held-out at step 2: top-1 {100 * last['val_top1']:.1f}%, top-5 "
                            f"{100 * last['val_top5']:.1f}%, loss {last['val_loss']:.3f} over 6 images (always the "
                            f"most common code: top-1 {100 * last['val_majority']:.1f}%)")
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    if last["val_top1"] <= last["val_majority"]:
        assert warning == [f"pretrain: warning: held-out top-1 {100 * last['val_top1']:.1f}% at step 2 is no better "
                           f"than always predicting the most common code ({100 * last['val_majority']:.1f}%): the "
                           "model has learned nothing beyond the code frequencies yet; train longer, or check the "
                           "tokens with beit-data inspect"]
    else:
        assert warning == []
    from pipelines.pretrain import PretrainResult

    def result(top1: float) -> PretrainResult:
        rows = [{"step": 0, "val_top1": 0.0, "val_majority": 0.05},
                {"step": 100, "val_top1": top1, "val_majority": 0.05}]
        return PretrainResult(steps=100, first_loss=None, last_loss=None, checkpoint="", skipped_rejected=0,
                              skipped_missing_shards=0, holdout=rows)

    assert result(0.05).warnings()[0].startswith("held-out top-1 5.0% at step 100 is no better than always "
                                                 "predicting the most common code (5.0%)")
    assert result(0.051).warnings() == []
