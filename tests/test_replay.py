"""The stream's Python half: it runs in DALI's worker process and yields the same batches."""

import numpy as np
import torch


def test_the_sample_work_runs_in_a_dali_worker_process(sample_shards, sample_tokens):
    import multiprocessing
    import pickle

    from beit_data.replay import OUTPUTS
    from beit_data.stream import StreamConfig, TrainStream

    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=3,
                                      num_threads=1))
    before = set(multiprocessing.active_children())
    it = stream.batches()
    b = next(it)
    assert len(set(multiprocessing.active_children()) - before) == 1  # DALI's spawned loader process
    # The source is a plain picklable iterable: in this process it yields the same first batch.
    direct = dict(zip(OUTPUTS, next(iter(pickle.loads(pickle.dumps(stream.source))))))
    assert [k.tobytes().decode() for k in direct["key"]] == b.keys
    assert torch.equal(torch.from_numpy(np.stack(direct["tokens"])), b.tokens)
    assert torch.equal(torch.from_numpy(np.stack(direct["mask"])), b.mask)
    it.close()


def test_the_loader_process_outlives_a_job_wide_sigterm_only_for_its_grace():
    """torchrun and Slurm send SIGTERM to the loader too: it must not die before the trainer's
    last step has its batch, but it must not linger either."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    code = ("import sys, time; from beit_data.loader_signals import outlive_job_signals; outlive_job_signals(1.5); "
            "print('ready', flush=True); time.sleep(60)")

    def started() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    proc = started()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # Ctrl-C to the group: ignored
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and 1.5 <= time.monotonic() - sent < 10

    proc = started()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # scancel's
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # torchrun's, to the worker's process group: the grace still runs
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and 1.5 <= time.monotonic() - sent < 10
