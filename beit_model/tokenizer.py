"""Visual tokenizers for the stages: the contract (``Tokenizer``) and the loader of their files.

``load_tokenizer`` reads a file (``beit_model.weights``, which runs no code from it) and gives the
kind it holds: a ``DVAETokenizer`` (``beit_model.dvae``) or a ``VQKDTokenizer``
(``beit_model.vqkd``). The contract they share lives in ``beit_model.tokenizer_base``, so the
kinds import it and this module imports the kinds, with no circle.
"""

from __future__ import annotations

from pathlib import Path

from beit_common import BeitDataError
from beit_model import dvae, vqkd
from beit_model.tokenizer_base import Tokenizer
from beit_model.weights import read_weights

__all__ = ["Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | Path, *, input_size: int | None = None, decoder: str | Path | None = None
                   ) -> Tokenizer:
    """Load a tokenizer from OpenAI's ``encoder.pkl``, a state dict, a project checkpoint or a
    released BEiT v2 VQ-KD checkpoint.

    Args:
        path: The encoder file (a ``decoder.pkl`` beside an ``encoder.pkl`` is found by itself),
            an encoder/decoder state dict (keys ``blocks.*``, or ``encoder.*``/``decoder.*``), a
            checkpoint written by ``beit-data train-dvae``, or a VQ-KD ``.pth`` (see ``beit_model.vqkd``).
        input_size: Square input side; default 112 (BEiT's), or the checkpoint's own.
        decoder: An explicit decoder file.

    Raises:
        BeitDataError: For a missing file, or a file of the wrong kind or shape.
    """
    path = Path(path)
    if not path.is_file():
        raise BeitDataError(f"tokenizer file not found: {path}")
    obj = read_weights(path)
    if not vqkd.is_vqkd(obj):
        return dvae.from_state(obj, path, input_size=input_size, decoder=decoder)
    if decoder:
        raise BeitDataError(f"{path} is a VQ-KD tokenizer, which has no pixel decoder; drop the decoder file")
    tokenizer = vqkd.from_state(obj, path)
    if input_size not in (None, tokenizer.input_size):
        raise BeitDataError(f"{path}: a VQ-KD tokenizer takes {tokenizer.input_size}-pixel inputs, not {input_size}")
    return tokenizer
