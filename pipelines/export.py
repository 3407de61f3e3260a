"""``beit-data export``: the pretrained encoder as timm ``Beit`` weights.

Two forms, by the name of ``out``:

- a folder (no ``.pth`` or ``.safetensors`` suffix): ``config.json`` and ``model.safetensors``,
  written by timm's own ``save_config_for_hf``, which ``timm.create_model('local-dir:OUT',
  pretrained=True, num_classes=N)`` opens as it is (and timm's ``train.py --model
  local-dir:OUT --pretrained``), with a new classifier for any ``N``;
- one ``.pth`` or ``.safetensors`` file, with a JSON beside it that names the timm model of the
  same size and the arguments that rebuild it, and the weights (``checkpoint_path``) by a path
  relative to the JSON itself (an object by its URL), so the pair can be moved together.

Both record the input the encoder was pretrained on (size, bicubic interpolation, and the run's
``mean`` and ``std``: ImageNet's by default), which timm's BEiT defaults (mean and std 0.5) would
otherwise replace silently.
Every file is written with the permissions of an ordinary file (``0666`` less the umask).
``config.json`` names timm's model of the same size (timm has no tiny BEiT: its family's base
builder, with the encoder's sizes in ``model_args``), none of the tag and licence of timm's own
weights, and the model pretrained as ``beit_data_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from beit_common import BeitDataError, Location, output_file, save_atomic, storage, write_atomic, write_text_atomic
from beit_common.files import ensure_writable_dir, output_location
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from pipelines.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint
from pipelines.checkpoint_history import run_checkpoint
from pipelines.config import EXPORT_FOLDER_FILES, ExportConfig

__all__ = ["ExportConfig", "run_export", "timm_architecture", "timm_args", "input_config", "FILE_SUFFIXES"]

FILE_SUFFIXES = (".pth", ".safetensors")


def timm_args(model_args: dict, img_size: int = 224) -> dict:
    """The timm ``Beit`` arguments that rebuild this encoder."""
    return {"img_size": img_size, "embed_dim": model_args["embed_dim"], "depth": model_args["depth"],
            "num_heads": model_args["num_heads"], "use_abs_pos_emb": False, "use_rel_pos_bias": True}


def timm_architecture(model_name: str) -> str:
    """The timm model of the same size (``beit_mim_base_patch16_224``: ``beit_base_patch16_224``);
    a size timm has none of (tiny) is built by its family's base entry point, with the encoder's
    own sizes in the arguments (``timm_args``), since timm opens only a name it registers."""
    from beit_model.beit_mim import TIMM_EQUIVALENT

    if model_name in TIMM_EQUIVALENT:
        return TIMM_EQUIVALENT[model_name]
    return "beitv2_base_patch16_224" if model_name.startswith("beitv2") else "beit_base_patch16_224"


def input_config(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict:
    """What the encoder saw in pretraining, in timm's ``pretrained_cfg`` terms (the training
    stream's view: bicubic, normalised with the run's ``mean`` and ``std``)."""
    return {"input_size": [3, img_size, img_size], "interpolation": "bicubic", "mean": list(mean), "std": list(std)}


def run_export(cfg: ExportConfig) -> dict:
    """Write the encoder of ``RUN/checkpoint.pt`` (or of the checkpoint the run keeps at ``step``)
    to ``out`` (a folder or a file; local or an object URL); returns how to load it in timm.

    Raises:
        BeitDataError: For an ``out`` that exists (without ``overwrite``) or cannot be written, or
            a ``step`` the run keeps no checkpoint of.
    """
    from beit_model.beit_mim import encoder_state_dict

    ckpt = load_checkpoint(run_checkpoint(cfg.run, cfg.step))
    out = cfg.out
    suffix = "." + out.name.rsplit(".", 1)[-1].lower() if "." in out.name else ""
    if suffix and suffix not in FILE_SUFFIXES:
        raise BeitDataError(f"`out` {out}: name a folder (no suffix), or a .pth or .safetensors file")
    folder = not suffix
    written = _folder(out, cfg.overwrite) if folder else output_file(out, "the encoder", overwrite=cfg.overwrite)
    model, record = model_from_checkpoint(ckpt), CheckpointMeta.from_checkpoint(ckpt)
    name = timm_architecture(record.model_name)
    img_size = model.patch_embed.img_size[0]
    args = timm_args(record.model_args, img_size)
    data = input_config(img_size, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    state = encoder_state_dict(model)
    info = {"timm_model": name, "timm_kwargs": {**args, "num_classes": 0}, "pretrained_cfg": data,
            "step": record.step}
    if folder:
        _write_folder(out, name, args, data, state, record.model_name)
        return {**info, "folder": storage.redact(str(written))}
    info_path = output_file(out.sibling(".json"), "the encoder's JSON", overwrite=cfg.overwrite)
    if suffix == ".safetensors":  # timm's create_model(checkpoint_path=...) reads either
        from safetensors.torch import save_file

        write_atomic(out, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
    else:
        save_atomic(state, out)
    # The JSON names its weights as a path that holds wherever it is read from: the file beside
    # it by name (relative to the JSON itself), an object by its URL; the caller gets an absolute path.
    write_text_atomic(info_path, json.dumps({**info, "checkpoint_path": out.reference(beside=True)}, indent=1))
    info["checkpoint_path"] = out.reference()
    return info


def _folder(out: Location, overwrite: bool) -> Path | str:
    """The export folder, made and proven writable; one that holds files is refused without
    ``overwrite`` (and then only its export files are replaced)."""
    folder = output_location(out, "the encoder folder")
    existing = [n for n in EXPORT_FOLDER_FILES if storage.exists(out / n)]
    local = out.local_path()
    if local is not None and local.is_file():
        raise BeitDataError(f"{local} is a file; give a folder, or a name ending in .pth or .safetensors")
    if existing and not overwrite:
        raise BeitDataError(f"{out / existing[0]} exists; pass `overwrite` to replace it")
    return ensure_writable_dir(folder)


def _write_folder(out: Location, name: str, args: dict, data: dict, state: dict, source: str) -> None:
    """timm's ``Beit`` with the encoder's weights and no classifier, saved by timm's own writer.

    The ``pretrained_cfg`` drops the tag and licence that timm's default configuration of ``name``
    carries (``in22k_ft_in22k_in1k``, apache-2.0: Microsoft's fine-tuned weights, not these), and
    ``beit_data_model`` names the model pretrained (``beit_mim_tiny_patch16_224``), which timm
    leaves alone: ``architecture`` is only the timm entry point that builds it."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # what timm's own push_to_hf_hub writes with

    own = {**data, "tag": None, "license": None}  # None is left out of config.json
    model = timm.create_model(name, pretrained=False, num_classes=0, pretrained_cfg_overlay=own, **args)
    model.load_state_dict(state)  # strict: every weight of timm's model comes from the encoder
    weights, config = (out / n for n in EXPORT_FOLDER_FILES)
    write_atomic(weights, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp)))
    write_atomic(config, lambda tmp: save_config_for_hf(model, str(tmp), model_args=args,
                                                                 model_config={"beit_data_model": source}))
