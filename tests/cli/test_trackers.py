"""Trackers: ``--log-to tensorboard,csv,wandb,mlflow``, each holding what ``log.jsonl`` holds,
offline (W&B's offline mode, MLflow's local file store), through a resume (issue 36, item 5)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from helpers import invoke, records

from beit_common import BeitDataError
from pipelines.config import PretrainConfig

FLAGS = ("--model", "beit_mim_tiny_patch16_224", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-3",
         "--log-every", "1", "--device", "cpu", "--num-threads", "1", "--checkpoint-every", "100", "--quiet")


def by_step(run: Path) -> dict[int, dict]:
    """``log.jsonl``'s figures merged by step, as one row of ``summary.csv`` holds them."""
    rows: dict[int, dict] = {}
    for r in records(run):
        if r["event"] in ("train", "val", "probe"):
            rows.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("event", "time")})
    return rows


def summary(run: Path) -> tuple[list[str], dict[int, dict]]:
    """``summary.csv``'s header and its rows by step, the numbers read back."""
    header, *lines = (run / "summary.csv").read_text().splitlines()
    columns = header.split(",")
    rows = [{c: float(v) for c, v in zip(columns, line.split(",")) if v} for line in lines]
    assert len({r["step"] for r in rows}) == len(rows)  # a row a step
    return columns, {int(r["step"]): r for r in rows}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): LevelDB's log format (32 KiB blocks of
    chunks with a 7-byte header) after W&B's own 7-byte header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    found, pos, part = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind, length) == (0, 0):  # the padding at a block's end
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            found.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return found


def key(item) -> str:
    """The name of an item of a W&B history or config record (a key, or a key path)."""
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow on a file store, everything under tmp_path; HOME an empty folder
    that must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in {"HOME": home, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wb",
                        "WANDB_CONFIG_DIR": tmp_path / "wb-config", "WANDB_CACHE_DIR": tmp_path / "wb-cache",
                        "WANDB_DATA_DIR": tmp_path / "wb-data", "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
                        "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(name, str(value))
    (tmp_path / "wb").mkdir()
    yield tmp_path
    assert list(home.iterdir()) == []


def test_every_tracker_holds_what_log_jsonl_holds_through_a_resume(sample_shards, sample_tokens, labeled_shards,
                                                                   offline, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = offline / "run"
    # Shards read through a command with a secret, on the command line (sys.argv) too; held-out
    # figures at steps 0, 2 and 3, the probe's at 0 and 3; a checkpoint at step 2.
    secret = f"pipe:env API_KEY=k3y-Secret cat {sample_shards}/sample-000000.tar"
    checks = ("--val-shards", sample_shards / "sample-000001.tar", "--val-tokens", sample_tokens, "--val-every", "2",
              "--probe-every", "3", "--probe-train", labeled_shards / "train", "--probe-val", labeled_shards / "val")
    args = ("pretrain", "--shards", secret, "--tokens", sample_tokens, *FLAGS, *checks, "--steps", "3", "--stop-after",
            "2", "--out", run, "--log-to", "csv,wandb,mlflow")
    monkeypatch.setattr(sys, "argv", ["beit-data", *map(str, args)])
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    # The held-out and probe figures are printed, a line each, when measured.
    assert "pretrain: held-out at step 2: top-1 " in first.stderr and "pretrain: k-NN probe at step 0: " in first.stderr
    assert json.loads((run / "config.json").read_text())["log_to"] == ["csv", "wandb", "mlflow"]
    assert yaml.safe_load((run / "config.yaml").read_text())["log_to"] == ["csv", "wandb", "mlflow"]
    ids = json.loads((run / "trackers.json").read_text())
    # What a run killed after step 3 leaves: a row after its checkpoint at step 2, and half a row.
    with (run / "summary.csv").open("a") as f:
        f.write("3,1,9.0\n4,1,9")
    # Resumed with nothing but the trackers, which may change: TensorBoard joins in.
    resumed = invoke("pretrain", "--out", run, "--resume", "--shards", secret, "--log-to",
                     "csv,wandb,mlflow,tensorboard")
    assert resumed.exit_code == 0, resumed.output
    assert "log_to ('csv', 'wandb', 'mlflow') -> ('csv', 'wandb', 'mlflow', 'tensorboard')" in resumed.stderr
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same W&B and MLflow runs
    logged = by_step(run)
    assert sorted(logged) == [0, 1, 2, 3] and {"loss", "val_top1", "probe_top1"} <= set(logged[3])

    # summary.csv: a row a step, log.jsonl's numbers under its names; the rows after the checkpoint dropped.
    columns, rows = summary(run)
    assert columns[:3] == ["step", "epoch", "loss"] and columns.index("acc") < columns.index("val_loss")
    assert rows == logged

    # TensorBoard joined at step 2: it holds the steps after it.
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(3, pytest.approx(logged[3]["val_top1"]))]

    # W&B: one run id, an offline run file for each invocation; every figure under its tag at its step.
    files = sorted((offline / "wb" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 2
    history, config = {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {key(item): json.loads(item.value_json) for item in record.history.item}
                history.setdefault(row["step"], {}).update(row)
            elif kind in ("config", "run"):
                items = record.config.update if kind == "config" else record.run.config.update
                config.update({key(item): json.loads(item.value_json) for item in items})
    assert sorted(history) == [0, 1, 2, 3]
    for step, figures in logged.items():
        tagged = {"step": step, **{(k.replace("_", "/", 1) if k.startswith(("val_", "probe_")) else f"train/{k}"): v
                                   for k, v in figures.items() if k != "step"}}
        assert {k: history[step][k] for k in tagged} == tagged, step
    recorded = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in ("lr", "seed", "model", "total_steps", "log_to")} == \
        {k: recorded[k] for k in ("lr", "seed", "model", "total_steps", "log_to")}

    # MLflow: one run, its params the settings, its metrics log.jsonl's at their steps.
    client = mlflow.tracking.MlflowClient()
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert {k: mlrun.data.params[k] for k in ("lr", "model", "seed", "betas", "val_tokens")} == \
        {"lr": "0.001", "model": "beit_mim_tiny_patch16_224", "seed": "0", "betas": "[0.9, 0.999]",
         "val_tokens": str(sample_tokens)}
    for name, tagged in (("loss", "train/loss"), ("val_top1", "val/top1"), ("probe_top1", "probe/top1")):
        got = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tagged))
        assert got == [(step, figures[name]) for step, figures in sorted(logged.items()) if name in figures]
    # No tracker stored the secret: not in W&B's files (its config, the command line it records), MLflow's
    # store, nor the run folder.
    assert [p for p in offline.rglob("*") if p.is_file() and b"k3y-Secret" in p.read_bytes()] == []


def test_an_unknown_tracker_or_a_missing_extra_is_one_line(tmp_path, monkeypatch):
    unknown = invoke("pretrain", "--shards", "s", "--tokens", tmp_path, "--out", tmp_path / "r", "--log-to",
                     "tensorboard,neptune")
    assert unknown.exit_code == 2 and unknown.stderr.splitlines()[-1] == ("Error: Invalid value for '--log-to': no "
                                                                          "tracker 'neptune'; choose from tensorboard, "
                                                                          "csv, wandb, mlflow (or none)")
    with pytest.raises(BeitDataError, match="^`log_to`: a tracker named twice in csv,csv$"):
        PretrainConfig.from_flat(shards="s", tokens="t", out="o", log_to="csv,csv")
    assert PretrainConfig.from_flat(shards="s", tokens="t", out="o", log_to="none").runtime.log_to == ()
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # what import finds where the package is not installed
        missing = invoke("pretrain", "--shards", "s", "--tokens", tmp_path, "--out", tmp_path / name, "--log-to",
                         f"csv,{name}")
        assert missing.exit_code == 1 and missing.stderr == (
            f"Error: --log-to {name}: the {name} package is not installed; pip install 'beit-data[{name}]'\n")
        assert not (tmp_path / name).exists()  # refused before the run folder is made
