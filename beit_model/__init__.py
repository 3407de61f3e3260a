"""Models: the dVAE tokenizers and the BEiT masked-image-modeling model."""
