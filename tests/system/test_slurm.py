"""Slurm without glue: a task's place from Slurm's variables, and the sbatch scripts of
``examples/slurm`` run as a job would run them, with a stand-in ``srun`` on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, free_port

from pipelines.runtime import first_host, slurm_env

# The fake Slurm job's rendezvous port comes from its job id: its tests run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("slurm")

FAKE = REPO / "tests" / "fake_slurm"
TINY_RUN = ("--model beit_mim_tiny_patch16_224 --steps 3 --batch-size 2 --warmup-steps 1 --device cpu "
            "--num-threads 1 --quiet")


def free_job_id() -> int:
    """A job id whose rendezvous port (20000 + id mod 20000) is free now, so that jobs of runs side
    by side on one machine do not meet."""
    for _ in range(200):
        port = free_port()
        if 20000 <= port < 40000:
            return port - 20000
    raise RuntimeError("no free port between 20000 and 40000")


JOB_ID = str(free_job_id())


def job_env(tasks: int, **extra: str) -> dict:
    """A job's environment on this machine: the fake srun and scontrol first on PATH, then the
    venv's console scripts; no torchrun variables."""
    keep = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MKL_CBWR")}
    return {**keep, "PATH": f"{FAKE}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "SLURM_JOB_ID": JOB_ID, "SLURM_NTASKS": str(tasks), "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "1",
            "SLURM_JOB_NODELIST": "localhost", **extra}


def sbatch(script: str, env: dict, cwd=REPO) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(REPO / "examples" / "slurm" / script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_task_takes_its_place_from_slurm_where_torchrun_says_nothing():
    assert first_host("gpu-[003-010,012],cpu01") == "gpu-003"
    assert (first_host("node7"), first_host("a01,a02"), first_host("n[1-2]")) == ("node7", "a01", "n1")
    assert first_host("node[01-04]-ib,x[1-2]") == "node01-ib"
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
           "SLURM_STEP_NODELIST": "gpu-[01-02]", "SLURM_JOB_NODELIST": "gpu-[01-04]", "SLURM_JOB_ID": "123"}
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-01",
                              "MASTER_PORT": "20123"}
    assert slurm_env({**env, "RANK": "0"}) == {}  # under torchrun, torchrun's
    assert slurm_env({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task: a single process
    assert slurm_env({k: v for k, v in env.items() if k != "SLURM_PROCID"}) == {}  # not an srun task
    # The batch script itself (SLURM_PROCID 0 of the job's 16 tasks, no step): one process.
    assert slurm_env({k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}
    assert slurm_env({**env, "SLURM_STEP_ID": "2"})["MASTER_PORT"] == "22123"  # a port per step
    given = slurm_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("head", "1234")


def test_tokenize_with_srun_alone_splits_the_shards_over_the_tasks(sample_shards, sample_tokens, tiny_tokenizer,
                                                                   tmp_path):
    out = tmp_path / "tokens"
    done = sbatch("tokenize.sbatch", job_env(2, SHARDS=str(sample_shards), TOKENIZER=str(tiny_tokenizer),
                                             TOKENS=str(out), VIEWS="4",
                                             EXTRA_ARGS="--batch-size 8 --device cpu --quiet"))
    assert done.stdout.count("tokenize: ") == 1  # the summary, from rank 0 only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"] == 2 and summary["images"] == 14
    for path in sorted(sample_tokens.glob("*.parquet")):  # what one process writes
        assert pq.read_table(out / path.name).equals(pq.read_table(path)), path.name


def test_pretrain_with_srun_alone_and_with_torchrun_per_node(sample_shards, sample_tokens, tmp_path):
    data = dict(SHARDS=str(sample_shards), TOKENS=str(sample_tokens), EXTRA_ARGS=TINY_RUN)
    sbatch("pretrain-srun.sbatch", job_env(2, OUT=str(tmp_path / "srun"), **data))
    # One task on the node runs torchrun with 2 processes, from a folder whose cli.py would shadow
    # `python -m cli`: the console script does not see it.
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "cli.py").write_text("raise SystemExit('the cli.py of the working folder ran')\n")
    sbatch("pretrain-torchrun.sbatch", job_env(1, OUT=str(tmp_path / "torchrun"), GPUS_PER_NODE="2",
                                               MASTER_PORT="29641", **data), cwd=tmp_path / "cwd")
    for name in ("srun", "torchrun"):
        ckpt = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert (ckpt["world_size"], ckpt["step"]) == (2, 3), name
    a, b = ([json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("srun", "torchrun"))
    # The same run, however it was launched, to float rounding: torchrun runs its workers with
    # OMP_NUM_THREADS=1, srun's tasks take the machine's threads, and the CPU sums differ.
    assert len(a) == len(b) == 1 and a == pytest.approx(b, rel=1e-5)


def test_probe_with_srun_alone_shares_the_encoding_and_scores_once(labeled_shards, tmp_path):
    """Two tasks encode every other shard each (5 and 5 shards: uneven images a rank), rank 0
    scores: the same figures as one process."""
    import timm

    from beit_model.beit_mim import encoder_state_dict
    from pipelines.export import timm_args
    from pipelines.shards import ShardsConfig, run_shards

    for part, count in (("train", 7), ("val", 4)):
        run_shards(ShardsConfig(min_size=0,
                                sources=[labeled_shards / "images" / part], out=tmp_path / part, maxcount=count,
                                progress=False))
    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()
    torch.save(encoder_state_dict(model), tmp_path / "enc.pth")
    (tmp_path / "enc.json").write_text(json.dumps({"timm_model": "beit_base_patch16_224", "timm_kwargs": {
        **timm_args({"embed_dim": 96, "depth": 4, "num_heads": 3}), "num_classes": 0}}))
    command = ["beit-data", "probe", str(tmp_path / "enc.pth"), "--train-shards", str(tmp_path / "train"),
               "--val-shards", str(tmp_path / "val"), "--linear", "--json", "--device", "cpu", "--quiet"]
    one = subprocess.run(command, env=job_env(1), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(FAKE / "srun"), *command], env=job_env(2), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout) == json.loads(one.stdout)  # printed once, by rank 0
    assert json.loads(one.stdout)["train_images"] == 30


def test_near_the_time_limit_the_pretrain_job_checkpoints_and_requeues_itself(sample_shards, sample_tokens,
                                                                              tmp_path):
    """Slurm's USR1 (``--signal=B:USR1@300``) to the batch script: the run stops after a step with
    its checkpoint, and the script requeues the job."""
    import signal
    import time

    out = tmp_path / "run"
    env = job_env(2, OUT=str(out), SHARDS=str(sample_shards), TOKENS=str(sample_tokens),
                  SCONTROL_LOG=str(tmp_path / "scontrol.log"),
                  EXTRA_ARGS=TINY_RUN.replace("--steps 3", "--steps 500") + " --log-every 1")
    job = subprocess.Popen(["bash", str(REPO / "examples" / "slurm" / "pretrain-srun.sbatch")], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 2:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert err.count("stopped by SIGTERM after step") == 1
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= ckpt["step"] < 500 and ckpt["world_size"] == 2


def test_a_requeued_job_resumes_its_run_on_object_storage_with_the_same_command(sample_shards, sample_tokens,
                                                                                tmp_path):
    """The sbatch script tests no file: ``--resume auto`` starts the run in an empty ``s3://`` prefix,
    and the requeued job, word for word the same, resumes it there. srun is given the task's CPUs."""
    from helpers.object_store import S3Server

    server = S3Server()
    try:
        server.client().create_bucket(Bucket="runs")
        out = "s3://runs/beit-tiny"
        env = job_env(1, OUT=out, SHARDS=str(sample_shards), TOKENS=str(sample_tokens),
                      EXTRA_ARGS=TINY_RUN.replace("--steps 3", "--steps 4 --stop-after 2 --log-every 1"),
                      SRUN_LOG=str(tmp_path / "srun.log"), BEIT_DATA_CACHE=str(tmp_path / "cache"), **server.env)
        first = sbatch("pretrain-srun.sbatch", env)
        assert "pretrain: steps 2" in first.stdout
        again = sbatch("pretrain-srun.sbatch", env)  # the requeued job: the same script, the same variables
        assert "pretrain: steps 4" in again.stdout  # from step 2 on: a new run into the prefix would be refused
        log = server.client().get_object(Bucket="runs", Key="beit-tiny/log.jsonl")["Body"].read().decode()
        assert [json.loads(line)["step"] for line in log.splitlines()] == [1, 2, 3, 4]
        body = server.client().get_object(Bucket="runs", Key="beit-tiny/checkpoint.pt")["Body"].read()
        (tmp_path / "checkpoint.pt").write_bytes(body)
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
        assert (tmp_path / "srun.log").read_text().splitlines() == ["--cpus-per-task=1"] * 2
    finally:
        server.close()
