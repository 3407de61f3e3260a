"""Models: the dVAE and VQ-KD tokenizers and the BEiT masked-image-modeling model.

Importing ``beit_model.beit_mim`` registers the ``beit_mim_*`` variants with timm, as timm plugins
do. The package itself imports no timm: ``tokenize`` (each rank, each Ray worker) loads a tokenizer
without it, about 2.5 s sooner.
"""
