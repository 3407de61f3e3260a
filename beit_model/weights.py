"""Reading weights files without running code from them.

Every ``.pt``/``.pth`` and state dict loads with ``torch.load(weights_only=True)``: tensors and
plain containers only. OpenAI's ``encoder.pkl``/``decoder.pkl`` are whole pickled modules of the
``dall_e`` package: for files named ``.pkl`` only, an unpickler with an allow-list reads them (the
``dall_e`` classes, replaced by a plain module, ``torch.nn`` modules, tensors and parameters,
``torch.device``, dtypes, ``OrderedDict`` and sets); any other name in the file is refused, and
only the weights are kept.
"""

from __future__ import annotations

import argparse
import pickle
import types
from pathlib import Path

import torch
import torch.nn as nn

from beit_common import BeitDataError, describe_file

__all__ = ["read_weights"]


class _PickledModule(nn.Module):
    """Stands in for any ``dall_e`` class while unpickling; only its weights are used."""

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)


# What OpenAI's encoder.pkl / decoder.pkl (whole pickled ``dall_e`` modules) refer to, and nothing
# more: the dall_e classes (replaced by a plain module), tensors, and torch's own modules.
_DALL_E_CLASSES = {"Encoder", "Decoder", "EncoderBlock", "DecoderBlock", "Conv2d"}
_DALL_E_MODULES = {"dall_e", "dall_e.encoder", "dall_e.decoder", "dall_e.utils"}
_ALLOWED = {("collections", "OrderedDict"), ("torch", "device"), ("torch", "Size"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
            ("torch._utils", "_rebuild_parameter_with_state"),
            *((builtins, name) for builtins in ("builtins", "__builtin__") for name in ("set", "frozenset"))}


class _DallEUnpickler(pickle.Unpickler):
    """Unpickles OpenAI's dall_e modules from an allow-list; any other global is refused, so a
    file cannot run code while it loads."""

    def find_class(self, module, name):
        if module in _DALL_E_MODULES and name in _DALL_E_CLASSES:
            return _PickledModule
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules."):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no DALL-E file holds")


def _safe_load(file, **kwargs):
    return _DallEUnpickler(file, **kwargs).load()


_dall_e_pickle = types.SimpleNamespace(Unpickler=_DallEUnpickler, load=_safe_load, __name__="dall_e_pickle")


def read_weights(path: Path):
    """A file's tensors: ``weights_only`` for every file, and for OpenAI's ``.pkl`` modules the
    allow-list above."""
    kind = describe_file(path)
    if kind not in ("a zip archive", "a Python pickle"):  # what torch.save and pickle write
        raise BeitDataError(f"{path} is not a PyTorch file: it is {kind}")
    try:
        # Training checkpoints (BEiT v2's among them) may keep their argparse settings beside the tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if path.suffix != ".pkl":  # only OpenAI's encoder.pkl / decoder.pkl hold whole modules
            detail = str(exc).strip().splitlines()[0][:160]
            raise BeitDataError(f"{path} holds more than tensors, and only OpenAI's .pkl files are unpickled beyond "
                                f"them (weights_only: {detail})") from None
    except Exception as exc:
        raise BeitDataError(f"{path} is not a readable PyTorch file: {str(exc).splitlines()[0][:200]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_dall_e_pickle)
    except pickle.UnpicklingError as exc:
        raise BeitDataError(f"{path} was not unpickled: {exc}; only OpenAI's dall_e modules load this way") from None
    except Exception as exc:
        raise BeitDataError(f"{path} could not be unpickled: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(obj, nn.Module):
        raise BeitDataError(f"{path} holds a {type(obj).__name__}, not a module or state dict")
    return {"__dall_e__": True, "state": obj.state_dict()}


