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
    assert len(set(multiprocessing.active_children()) - before) == 1  # DALI's loader process
    # The source is a plain picklable iterable: in this process it yields the same first batch.
    direct = dict(zip(OUTPUTS, next(iter(pickle.loads(pickle.dumps(stream.source))))))
    assert [k.tobytes().decode() for k in direct["key"]] == b.keys
    assert torch.equal(torch.from_numpy(np.stack(direct["tokens"])), b.tokens)
    assert torch.equal(torch.from_numpy(np.stack(direct["mask"])), b.mask)
    it.close()


