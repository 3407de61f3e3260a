"""``beit-data export``: the pretrained encoder as timm ``Beit`` weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from beit_data import BeitDataError, ensure_writable_dir

__all__ = ["run_export", "timm_args"]


def timm_args(model_args: dict) -> dict:
    """The timm ``beit_base_patch16_224`` arguments that rebuild this encoder."""
    return {"embed_dim": model_args["embed_dim"], "depth": model_args["depth"], "num_heads": model_args["num_heads"],
            "use_abs_pos_emb": False, "use_rel_pos_bias": True}


def run_export(run: str | Path, out: str | Path) -> dict:
    """Write the encoder of ``RUN/checkpoint.pt`` to ``out``; returns how to load it in timm."""
    from beit_model.beit_mim import encoder_state_dict
    from pipelines.pretrain import CHECKPOINT, PretrainConfig, build_model

    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise BeitDataError(f"no checkpoint at {path}; give the --out folder of a pretrain run")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = PretrainConfig(**{**ckpt["config"], "betas": tuple(ckpt["config"]["betas"])})
    model = build_model(cfg, ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    out = Path(out)
    ensure_writable_dir(out.parent)
    torch.save(encoder_state_dict(model), out)
    args = timm_args(ckpt["model_args"])
    info = {"timm_model": "beit_base_patch16_224", "timm_kwargs": {**args, "num_classes": 0},
            "checkpoint_path": str(out), "step": ckpt["step"]}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info
