"""Models: the dVAE tokenizers and the BEiT masked-image-modeling model.

Importing the package registers the ``beit_mim_*`` variants with timm, as timm plugins do.
"""

from beit_model import beit_mim  # noqa: F401  (registers the timm variants)
