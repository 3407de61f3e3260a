"""dVAE tokenizers: OpenAI's DALL-E encoder (and decoder) and the project's own checkpoints.

A dVAE maps a [0,1] image batch (B,3,H,W) to logits (B,vocab,H/8,W/8); ``encode`` returns the
argmax ids. Its architecture is ``beit_model.dall_e``'s; the sizes of a file's encoder and
decoder are read off its weights (``from_state``). ``beit_model.tokenizer.load_tokenizer``
reads the files and hands dVAE weights here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_common import BeitDataError, save_atomic
from beit_model.dall_e import Decoder, Encoder, map_pixels
from beit_model.tokenizer_base import Tokenizer, fingerprint
from beit_model.weights import read_weights

__all__ = ["DVAEConfig", "CONFIGS", "DVAETokenizer", "from_state", "reconstruct", "tokenizer_state",
           "save_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "beit-data-dvae/1"


def check_input_size(size: int) -> None:
    if size % 8:
        raise BeitDataError(f"tokenizer input size must be divisible by 8, got {size}")


@dataclass(frozen=True, kw_only=True)
class DVAEConfig:
    """Architecture of a dVAE; OpenAI's DALL-E values are the defaults."""

    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    n_init: int = 128
    input_size: int = 112

    def __post_init__(self):
        check_input_size(self.input_size)

    def build(self) -> tuple[Encoder, Decoder]:
        """A freshly initialised encoder and decoder of this architecture."""
        return (Encoder(n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group, vocab_size=self.vocab_size),
                Decoder(n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group, vocab_size=self.vocab_size,
                        n_init=self.n_init))


CONFIGS = {
    "dalle": DVAEConfig(),
    "tiny": DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=64),
}


class DVAETokenizer(Tokenizer):
    """A dVAE encoder (and optional decoder) behind the tokenizer contract.

    Attributes:
        name: ``dall-e`` for OpenAI's weights, ``dvae`` for the project's own.
        fingerprint: sha256 of the encoder weights.
        vocab_size, input_size, grid: codebook size, square input side, token grid side.
    """

    kind = "dvae"

    def __init__(self, encoder: Encoder, decoder: Decoder | None = None, *, name: str, input_size: int):
        super().__init__()
        check_input_size(input_size)
        self.encoder, self.decoder = encoder, decoder
        self.name, self.input_size = name, input_size
        self.vocab_size = encoder.vocab_size
        self.grid = input_size // 8
        self.fingerprint = fingerprint(encoder.state_dict())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,vocab,H/8,W/8) for images in [0,1]."""
        self.check_images(x)
        return self.encoder(map_pixels(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B,H/8,W/8)."""
        return self.logits(x).argmax(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images (B,3,8h,8w) in [0,1] from ids (B,h,w)."""
        if self.decoder is None:
            raise BeitDataError(f"tokenizer {self.name} has no decoder; give a file with decoder weights")
        return reconstruct(self.decoder, ids)


def reconstruct(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Images (B,3,8h,8w) in [0,1] from token ids (B,h,w), through their one-hot codes."""
    z = F.one_hot(ids.long(), decoder.vocab_size).permute(0, 3, 1, 2).float()  # (B, vocab, h, w)
    return decoder.reconstruct(z)


# ---- loading -------------------------------------------------------------------------------


def _count_blocks(state: dict) -> int:
    return len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})


def _build(kind: str, state: dict, path: Path) -> nn.Module:
    """An Encoder or Decoder whose sizes are read off the weights, with the weights loaded."""
    try:
        if kind == "encoder":
            n_hid, vocab = state["blocks.input.w"].shape[0], state["blocks.output.conv.w"].shape[0]
            module = Encoder(n_hid=n_hid, n_blk_per_group=_count_blocks(state), vocab_size=vocab)
        else:
            n_init, vocab = state["blocks.input.w"].shape[:2]
            n_hid = state["blocks.output.conv.w"].shape[1]
            module = Decoder(n_hid=n_hid, n_blk_per_group=_count_blocks(state), vocab_size=vocab, n_init=n_init)
        module.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, IndexError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)[:400]
        raise BeitDataError(
            f"{path}: not a DALL-E-architecture {kind} (expected parameters such as blocks.input.w, "
            f"blocks.group_1.block_1.res_path.conv_1.w, blocks.output.conv.w): {detail}") from None
    return module


def _is_decoder(state: dict) -> bool:
    w = state.get("blocks.input.w")
    return w is not None and w.shape[2] == 1 and w.shape[1] != 3


def from_state(obj, path: Path, *, input_size: int | None = None, decoder: str | Path | None = None
               ) -> DVAETokenizer:
    """The dVAE of what ``read_weights`` read from ``path``: a project checkpoint, an encoder (or
    encoder and decoder) state dict, or OpenAI's pickled encoder (its ``decoder.pkl`` beside it is
    found by itself).

    Raises:
        BeitDataError: For weights of another shape, or a decoder file that holds none.
    """
    dec = None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        cfg = DVAEConfig(**obj["config"])
        enc = _build("encoder", obj["encoder"], path)
        dec = _build("decoder", obj["decoder"], path) if obj.get("decoder") else None
        return DVAETokenizer(enc, dec, name="dvae", input_size=input_size or cfg.input_size).eval()
    if not isinstance(obj, dict):
        raise BeitDataError(f"{path} holds a {type(obj).__name__}, not a tokenizer")
    name = "dall-e" if obj.pop("__dall_e__", False) else "dvae"
    state = obj.get("state", obj)
    if any(k.startswith("encoder.") for k in state):
        enc_state = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
        dec_state = {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}
        enc = _build("encoder", enc_state, path)
        dec = _build("decoder", dec_state, path) if dec_state else None
    else:
        if _is_decoder(state):
            raise BeitDataError(f"{path} holds DALL-E decoder weights; give the encoder file as the tokenizer")
        enc = _build("encoder", state, path)
    # OpenAI's decoder.pkl is found beside its encoder.pkl, never beside a state dict.
    decoder_path = Path(decoder) if decoder else path.with_name("decoder.pkl") if name == "dall-e" else None
    if dec is None and decoder_path is not None and decoder_path.is_file() and decoder_path != path:
        dec_obj = read_weights(decoder_path)
        dec_state = dec_obj.get("state", dec_obj) if isinstance(dec_obj, dict) else None
        if dec_state is None or not _is_decoder(dec_state):
            raise BeitDataError(f"{decoder_path} does not hold DALL-E decoder weights")
        dec = _build("decoder", dec_state, decoder_path)
    elif decoder and not Path(decoder).is_file():
        raise BeitDataError(f"decoder file not found: {decoder_path}")
    return DVAETokenizer(enc, dec, name=name, input_size=input_size or 112).eval()


def tokenizer_state(config: DVAEConfig, encoder: Encoder, decoder: Decoder) -> dict:
    """What a project dVAE file holds for ``from_state``: its format, architecture and weights.
    ``save_checkpoint`` writes it alone; a ``train-dvae`` checkpoint (``pipelines.checkpoint``)
    holds the run's training state beside it, so it loads as a tokenizer too."""
    return {"format": CHECKPOINT_FORMAT, "config": asdict(config), "encoder": encoder.state_dict(),
            "decoder": decoder.state_dict()}


def save_checkpoint(path: str | Path, tokenizer_config: DVAEConfig, encoder: Encoder, decoder: Decoder) -> None:
    """Write a project dVAE tokenizer file atomically; ``load_tokenizer`` needs nothing else."""
    save_atomic(tokenizer_state(tokenizer_config, encoder, decoder), path)
