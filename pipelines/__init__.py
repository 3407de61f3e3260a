"""The stages, for Python: each is a config dataclass in and a result out, as the commands run them.

    from pipelines import ShardsConfig, run_shards, TokenizeConfig, run_tokenize

``docs/python-api.md`` walks through them. A stage's module is imported when one of its names
is first used, so ``import pipelines`` costs nothing; nothing in ``beit_data``, ``beit_model``
or ``beit_common`` imports this package.
"""

from __future__ import annotations

import importlib

# Each public name of the API and the module that holds it.
_API = {
    "ShardsConfig": "pipelines.config", "run_shards": "pipelines.shards", "ShardsResult": "pipelines.shards",
    "TrainDVAEConfig": "pipelines.config", "run_train_dvae": "pipelines.train_dvae",
    "TokenizeConfig": "pipelines.config", "run_tokenize": "pipelines.tokenize_shards",
    "TokenizeResult": "pipelines.tokenize_shards",
    "PretrainConfig": "pipelines.config", "run_pretrain": "pipelines.pretrain",
    "PretrainResult": "pipelines.pretrain",
    "ExportConfig": "pipelines.config", "run_export": "pipelines.export",
    "ProbeConfig": "pipelines.config", "run_probe": "pipelines.probe",
    "InspectConfig": "pipelines.config", "run_inspect": "pipelines.inspect_tokens",
    "IndexConfig": "pipelines.config", "run_index": "pipelines.index",
    "PlanConfig": "pipelines.config", "run_plan": "pipelines.plan",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
