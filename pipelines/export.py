"""``beit-data export``: the pretrained encoder as timm ``Beit`` weights.

The weights go to a ``.pth`` (torch) or ``.safetensors`` file, by the name's suffix, with a
JSON beside it that names the timm model of the same size and the arguments that rebuild it.
"""

from __future__ import annotations

import json

from beit_common import Location, output_file, save_atomic, storage, write_atomic, write_text_atomic
from pipelines.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from pipelines.config import ExportConfig

__all__ = ["ExportConfig", "run_export", "timm_args"]


def timm_args(model_args: dict) -> dict:
    """The timm ``Beit`` arguments that rebuild this encoder."""
    return {"embed_dim": model_args["embed_dim"], "depth": model_args["depth"], "num_heads": model_args["num_heads"],
            "use_abs_pos_emb": False, "use_rel_pos_bias": True}


def run_export(cfg: ExportConfig) -> dict:
    """Write the encoder of ``RUN/checkpoint.pt`` to ``out`` (a local path or an object URL),
    with its JSON beside it; returns how to load it in timm.

    Raises:
        BeitDataError: For an ``out`` that exists (without ``overwrite``) or cannot be written.
    """
    from beit_model.beit_mim import TIMM_EQUIVALENT, encoder_state_dict

    out, overwrite = cfg.out, cfg.overwrite
    ckpt = load_checkpoint(checkpoint_path(cfg.run))
    out = output_file(out, "the encoder", overwrite=overwrite)
    info_path = output_file(Location(out).sibling(".json"), "the encoder's JSON", overwrite=overwrite)
    model = model_from_checkpoint(ckpt)
    state = encoder_state_dict(model)
    if str(out).endswith(".safetensors"):  # timm's create_model(checkpoint_path=...) reads either
        from safetensors.torch import save_file

        write_atomic(out, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
    else:
        save_atomic(state, out)
    args = timm_args(ckpt["model_args"])
    info = {"timm_model": TIMM_EQUIVALENT.get(ckpt["model_name"], "beit_base_patch16_224"),
            "timm_kwargs": {**args, "num_classes": 0}, "checkpoint_path": storage.redact(str(out)),
            "step": ckpt["step"]}
    write_text_atomic(info_path, json.dumps(info, indent=1))
    return info
