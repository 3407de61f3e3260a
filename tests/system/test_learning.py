"""Learning: masked-token accuracy on the sample's replayed crops beats the modal-code baseline.

A system test because it trains three small models (a dVAE and two BEiT arms) for about a minute.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import TINY

from pipelines.pretrain import PretrainConfig, run_pretrain


@pytest.mark.xdist_group("trained_tokenizer")  # one worker builds it while the other goes on
def test_learning_proves_the_replayed_crops_match_their_tokens(sample_shards, trained_tokenizer, tmp_path):
    """Masked-token accuracy beats the most-frequent-token baseline, and shuffled targets learn less."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(trained_tokenizer), out=str(tmp_path / "t"),
                                views=10, device="cpu", progress=False))
    tokens = np.concatenate([np.stack(pq.read_table(p).column("tokens").to_numpy(zero_copy_only=False))
                             for p in (tmp_path / "t").glob("*.parquet")])
    baseline = np.bincount(tokens.ravel()).max() / tokens.size
    accuracy = {}
    for shuffle in (False, True):
        out = tmp_path / f"run-{shuffle}"
        run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(tmp_path / "t"), out=str(out),
                                              steps=60,
                                    drop_path=0.0, shuffle_targets=shuffle,
                                    **{**TINY, "batch_size": 8, "warmup_steps": 20, "lr": 2e-3}))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        accuracy[shuffle] = float(np.mean([r["acc"] for r in log[-40:] if "acc" in r]))
    print(f"baseline {baseline:.3f}  aligned {accuracy[False]:.3f}  shuffled {accuracy[True]:.3f}")
    assert accuracy[False] > baseline + 0.1
    assert accuracy[False] > accuracy[True] + 0.05
