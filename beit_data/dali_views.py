"""The DALI graph that turns encoded images and stored views into model-ready tensors.

One graph definition serves the CPU and the GPU: only the decoder's device changes
(``"cpu"`` or ``"mixed"``); every later operator follows its input's device. Per view, the
graph resizes the crop window to ``size`` (Lanczos for the tokenizer, bicubic for the ViT),
applies the colour jitter in the fixed order brightness, contrast, saturation, then flips and
normalises to CHW.

Inputs come from an external source rather than DALI's webdataset reader: each view's window
depends on the key and the decoded size, which are known in Python before the batch is fed,
and a damaged sample must become a reject rather than fail the batch. The inputs are either
fed batch by batch (``DaliViews.__call__``) or pulled from a Python iterable that DALI runs in
a worker process of its own (``DaliViews.stream``), off the calling process's GIL.

That process is forked on the CPU, where it starts in milliseconds, and spawned on the GPU,
where a fork after CUDA is up is unsafe; ``BEIT_DATA_LOADER_START=spawn`` (or ``fork``) picks
one. A spawned loader imports the main module again, so a script must guard its entry point.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from beit_common import BeitDataError
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from beit_data.views import View, roi

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
except ImportError as exc:
    raise BeitDataError(
        f"NVIDIA DALI is not installed ({exc}): pip install 'beit-data[cuda13]' for CUDA 13, or "
        "'beit-data[cuda12]' for CUDA 12 (either runs on the CPU too)") from None

__all__ = ["ViewSpec", "DaliViews", "UndecodableImage", "IMAGENET_MEAN", "IMAGENET_STD", "UNIT_RANGE"]

UNIT_RANGE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std giving [0,1] pixels
INTERP = {"lanczos": types.INTERP_LANCZOS3, "bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


class UndecodableImage(BeitDataError):
    """DALI could not decode an image of a batch; ``sample`` is its place in the batch."""

    def __init__(self, sample: int):
        super().__init__(f"DALI could not decode sample #{sample} of the batch")
        self.sample = sample


@dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """What the view graph produces: the settings of one DALI pipeline.

    Attributes:
        views: Views per image; the image is decoded once for all of them.
        size: Output side in pixels.
        interp: ``lanczos``, ``bicubic`` or ``bilinear``.
        jitter: Apply the stored jitter factors.
        mean, std: Per-channel normalisation, in [0,1] pixel units.
        half: Output float16 instead of float32.
        roi_decode: Decode only the window (one view per image), as the training replay does.
    """

    views: int = 1
    size: int = 112
    interp: str = "lanczos"
    jitter: bool = True
    mean: Sequence[float] = UNIT_RANGE[0]
    std: Sequence[float] = UNIT_RANGE[1]
    half: bool = False
    roi_decode: bool = False

    def __post_init__(self):
        if self.roi_decode and self.views != 1:
            raise ValueError("roi_decode decodes one window per image, so views must be 1")
        if self.interp not in INTERP:
            raise ValueError(f"interp must be one of {sorted(INTERP)}")


def _gray(img):
    return img[:, :, 0] * _LUMA[0] + img[:, :, 1] * _LUMA[1] + img[:, :, 2] * _LUMA[2]


def apply_jitter(img, brightness, contrast, saturation):
    """torchvision's adjust_brightness, adjust_contrast, adjust_saturation, in that order."""
    img = dmath.clamp(img * brightness, 0.0, 255.0)
    mean = fn.reductions.mean(_gray(img))
    img = dmath.clamp(img * contrast + mean * (1.0 - contrast), 0.0, 255.0)
    gray = fn.expand_dims(_gray(img), axes=[2], new_axis_names="C")
    return dmath.clamp(img * saturation + gray * (1.0 - saturation), 0.0, 255.0)


def _resize(spec: ViewSpec, image, window):
    """The window (x0, y0, x1, y1) of a decoded image, resized to the spec's side."""
    return fn.resize(image, size=[spec.size, spec.size], roi_start=window[1::-1], roi_end=window[3:1:-1],
                     roi_relative=False, interp_type=INTERP[spec.interp], antialias=True, dtype=types.FLOAT)


def _crop_resize(spec: ViewSpec, encoded, decoder_device: str, roi):
    """The decoded image (None for a ROI decode) and each view's window, decoded and resized;
    ``roi`` is (V,4) rows of x0, y0, x1, y1."""
    if spec.roi_decode:
        window = roi[0]
        image = fn.decoders.image_slice(encoded, window[0:2], window[2:4] - window[0:2], device=decoder_device,
                                        output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                                        normalized_shape=False)
        return None, [fn.resize(image, size=[spec.size, spec.size], interp_type=INTERP[spec.interp], antialias=True,
                                dtype=types.FLOAT)]
    image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    return image, [_resize(spec, image, roi[v]) for v in range(spec.views)]


def _finish(spec: ViewSpec, view, flip, jitter):
    """Jitter (or clamp), flip and normalise one resized view to CHW."""
    if spec.jitter:
        view = apply_jitter(view, jitter[0], jitter[1], jitter[2])
    else:
        view = dmath.clamp(view, 0.0, 255.0)  # Lanczos and bicubic overshoot at edges
    return fn.crop_mirror_normalize(view, mirror=flip, mean=[255 * m for m in spec.mean],
                                    std=[255 * s for s in spec.std], output_layout="CHW",
                                    dtype=types.FLOAT16 if spec.half else types.FLOAT)


_INPUTS = {"encoded": (types.UINT8, 1), "roi": (types.FLOAT, 2), "flips": (types.INT32, 1), "jitter": (types.FLOAT, 2)}


@pipeline_def
def view_pipeline(spec: ViewSpec, decoder_device: str, source=None, extra_dtypes=(), target: ViewSpec | None = None):
    """Per image: encoded bytes, roi (V, 4) rows of x0, y0, x1, y1, flips (V,), jitter (V, 3).

    With ``source``, one parallel external source yields those four and ``extra_dtypes``
    more outputs, which pass through the graph untouched after the views. With ``target``,
    the first view is also made to that spec from the same decoded image (the tokenizer's
    view of the model's crop), and comes after the views.
    """
    if source is None:
        encoded, roi, flips, jitter = (fn.external_source(name=name, dtype=dtype, ndim=ndim)
                                       for name, (dtype, ndim) in _INPUTS.items())
        extras = []
    else:
        encoded, roi, flips, jitter, *extras = fn.external_source(
            source=source, num_outputs=len(_INPUTS) + len(extra_dtypes), batch=True, parallel=True,
            prefetch_queue_depth=2, dtype=[dtype for dtype, _ in _INPUTS.values()] + list(extra_dtypes))
    image, views = _crop_resize(spec, encoded, decoder_device, roi)
    outputs = [_finish(spec, view, flips[v], jitter[v]) for v, view in enumerate(views)]
    if target is not None:
        outputs.append(_finish(target, _resize(target, image, roi[0]), flips[0], jitter[0]))
    return (*outputs, *extras)


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy one output batch into a new torch tensor on ``device``."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        dtype = torch.float16 if dense.dtype == types.FLOAT16 else torch.float32
        out = torch.empty(dense.shape(), dtype=dtype, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


def _dali_reason(exc: Exception) -> str:
    """The useful line of a DALI pipeline error (the rest is the graph's traceback)."""
    lines = [ln.strip(" :") for ln in str(exc).splitlines() if ln.strip(" :")]
    useful = [ln for ln in lines if ln.startswith(("Failed", "Error", "Unsupported", "Unrecognized"))]
    return (useful[-1] if useful else lines[-1] if lines else type(exc).__name__)[:200]


def loader_start(gpu: bool) -> str:
    """How DALI starts the loader process: ``$BEIT_DATA_LOADER_START``, else spawn on the GPU
    and fork on the CPU (where the spawned process's imports cost a second each run), unless this
    process already talks to object storage or HTTP: a forked loader would share its open
    connections and the event loop that drives them (``remote_io_running``)."""
    method = os.environ.get("BEIT_DATA_LOADER_START") or ("spawn" if gpu or remote_io_running() else "fork")
    if method not in ("fork", "spawn"):
        raise BeitDataError(f"BEIT_DATA_LOADER_START={method!r}: use fork or spawn")
    if gpu and method == "fork":
        raise BeitDataError("BEIT_DATA_LOADER_START=fork: a loader on the GPU must be spawned (CUDA does not "
                            "survive a fork)")
    return method


def ready_to_fork() -> None:
    """Load in this process what a forked loader would load on its first batch, once for all of
    them: pyarrow imports pandas the first time it converts an array (a quarter of a second of
    CPU), which each forked loader (each run, each held-out evaluation) would do again."""
    import pyarrow as pa

    pa.array(np.zeros(1, np.int64))


def remote_io_running() -> bool:
    """Whether fsspec's event loop (s3fs, gcsfs, HTTP) runs in this process, with its connections."""
    asyn = sys.modules.get("fsspec.asyn")
    return asyn is not None and asyn.loop[0] is not None


class DaliViews:
    """Runs the view graph on batches of encoded images and their views.

    Args:
        spec: What to produce.
        batch_size: Largest batch.
        device: ``cpu`` decodes on the CPU; ``cuda`` decodes with nvJPEG (``mixed``).
        num_threads: CPU threads of the pipeline.
        target: Also the tokenizer's view of each image's first window, from the same decode
            (``stream`` only).
    """

    def __init__(self, spec: ViewSpec, *, batch_size: int, device: torch.device | str = "cpu",
                 num_threads: int = 2, target: ViewSpec | None = None):
        if target is not None and (spec.roi_decode or target.views != 1):
            raise ValueError("a target view needs the whole image decoded, and is one view")
        self.spec, self.batch_size, self.target = spec, batch_size, target
        self.device = torch.device(device)
        self.num_threads = num_threads
        self._pipe = None

    def _build(self, source=None, extra_dtypes=()):
        gpu = self.device.type == "cuda"
        common = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None)
        if source is None:  # fed batch by batch: run each fed batch at once
            pipe = view_pipeline(self.spec, "mixed" if gpu else "cpu", prefetch_queue_depth=1, exec_async=False,
                                 exec_pipelined=False, **common)
        else:
            # Pulled: one worker process runs the source (forked on the CPU, spawned on the GPU).
            # It needs a pipelined executor, which runs ahead by two batches; with the dynamic one an
            # error comes with the run it belongs to (an undecodable image's "sample #N" is in the
            # batch asked for: tests/cli/test_online.py). Outputs are copied out before the next run.
            start = loader_start(gpu)
            if start == "fork":
                ready_to_fork()
            pipe = view_pipeline(self.spec, "mixed" if gpu else "cpu", source, extra_dtypes, self.target,
                                 py_num_workers=1, py_start_method=start, prefetch_queue_depth=2,
                                 exec_dynamic=True, **common)
        try:
            pipe.build()
        except RuntimeError as exc:
            if "Workers initialization failed" not in str(exc):
                raise
            raise BeitDataError(
                "DALI could not start its loader process. It is spawned, so it imports the main module "
                "again: a script that trains with beit-data must guard its entry point with "
                "`if __name__ == \"__main__\":`") from exc
        return pipe

    def stream(self, source, extra_dtypes=()):
        """Yield ``(views, targets, extras)`` forever for the batches of an endless iterable ``source``.

        ``source`` yields per batch a tuple: encoded, roi, flips and jitter as in the graph's
        inputs, then one output per ``extra_dtypes``; each is a list of per-sample arrays or
        one (B, ...) array. It must be picklable: DALI runs it in a worker process. ``views``
        is (B, V, 3, S, S) on the device; ``targets`` the (B, 3, T, T) target views, or None
        without ``target``; ``extras`` are DALI CPU tensor lists, valid until the next batch
        is asked for.
        """
        pipe = self._build(source, extra_dtypes)
        try:
            while True:
                try:
                    outputs = pipe.run()
                except Exception as exc:  # the worker's traceback, as text; keep a BeitDataError one
                    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                    prefix = f"{BeitDataError.__module__}.{BeitDataError.__name__}: "
                    if last.startswith(prefix):
                        raise BeitDataError(last[len(prefix):]) from exc
                    failed = re.search(r"Failed to decode sample #(\d+)", str(exc))
                    if failed:  # the caller knows which image that is
                        raise UndecodableImage(int(failed.group(1))) from exc
                    raise
                n = self.spec.views + (self.target is not None)
                targets = _to_torch(outputs[n - 1], self.device) if self.target is not None else None
                yield self._views_tensor(outputs[:self.spec.views]), targets, outputs[n:]
        finally:
            del pipe  # DALI stops the worker process when the pipeline goes

    def __call__(self, encoded: Sequence[bytes], views: Sequence[Sequence[View]]) -> torch.Tensor:
        """Tensors (B, V, 3, size, size) for B images and their V views each.

        Raises:
            RuntimeError: DALI's error when an image in the batch cannot be decoded.
        """
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        pipe.feed_input("roi", [roi(vs) for vs in views])
        pipe.feed_input("flips", [np.array([v.flip for v in vs], np.int32) for vs in views])
        if self.spec.jitter:  # otherwise DALI prunes the unused input
            pipe.feed_input("jitter", [np.array([[v.brightness, v.contrast, v.saturation] for v in vs], np.float32)
                                       for vs in views])
        try:
            outputs = pipe.run()
        except Exception:
            self._pipe = None  # a failed pipeline is not reused
            raise
        return self._views_tensor(outputs)

    def _views_tensor(self, outputs) -> torch.Tensor:
        """(B, V, 3, S, S) from the V view outputs."""
        if len(outputs) == 1:
            return _to_torch(outputs[0], self.device).unsqueeze(1)  # no copy
        return torch.stack([_to_torch(o, self.device) for o in outputs], dim=1)

    def decode_or_reject(self, encoded: Sequence[bytes], views: Sequence[Sequence[View]]
               ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
        """Like ``__call__``, but a failing image becomes a reject instead of failing the batch.

        Returns:
            The tensors of the good images, their indices in the batch, and (index, reason)
            for each image DALI could not decode.
        """
        try:
            return self(encoded, views), list(range(len(encoded))), []
        except RuntimeError:
            pass
        good, bad, tensors = [], [], []
        for i, (e, vs) in enumerate(zip(encoded, views)):
            try:
                tensors.append(self([e], [vs]))
                good.append(i)
            except RuntimeError as exc:
                bad.append((i, f"decoder failed: {_dali_reason(exc)}"))
        return (torch.cat(tensors) if tensors else None), good, bad
