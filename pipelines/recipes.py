"""The papers' recipes: the settings each one fixes, named once for every stage that follows them."""

from __future__ import annotations

from beit_common import BeitDataError
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from beit_data.views import ViewRecipe

__all__ = ["RECIPES", "TOKENIZER_RECIPE", "DVAE_CONFIGS", "check_recipe_name", "view_recipe", "normalisation_note"]

# The dVAE architectures of ``beit_model.dvae.CONFIGS`` (named here so this module needs no torch).
DVAE_CONFIGS = ("tiny", "dalle")

# The papers' recipes for ViT-B/16, in one place. ``beit``: BEiT (Bao et al., ICLR 2022), 800
# epochs, DALL-E tokens of a 112-pixel Lanczos view. ``beitv2``: BEiT v2 (Peng et al., 2022) as in
# unilm's beit2/PRETRAINING.md, 1600 epochs, VQ-KD tokens of the model's own 224-pixel bicubic
# view, crops of at least 20% of the image, and the extra head after block 9. Both: batch 2048
# in all, AdamW (0.9, 0.999), weight decay 0.05, clip 3.0, 75 masked patches, colour jitter 0.4.
# ``mean``/``std``: the model input's normalisation a recipe trains with; the tokenizers take [0,1]
# pixels and normalise them themselves (the dVAE's logit-Laplace map, VQ-KD's [-1, 1]), whatever
# the model's input is. Both are ImageNet's, what every beit-data run has used.
RECIPES = {
    "beit": {"min_scale": 0.08, "tokenizer_filter": "lanczos", "model": "beit_mim_base_patch16_224",
             "epochs": 800, "lr": 1.5e-3, "warmup_epochs": 10.0, "layer_scale": 0.1, "drop_path": 0.1,
             "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "beitv2": {"min_scale": 0.2, "tokenizer_filter": "bicubic", "model": "beitv2_mim_base_patch16_224",
               "epochs": 1600, "lr": 1.5e-3, "warmup_epochs": 10.0, "layer_scale": 0.1, "drop_path": 0.1,
               "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}
# The recipe tokenize follows when none is named: the one each kind of tokenizer was made for.
TOKENIZER_RECIPE = {"dvae": "beit", "vqkd": "beitv2"}


def check_recipe_name(name: str | None) -> None:
    if name is not None and name not in RECIPES:
        raise BeitDataError(f"`recipe` must be one of {sorted(RECIPES)}, got {name}")


def view_recipe(recipe: str, *, views: int, seed: int, target_jitter: bool = True, min_scale: float | None = None):
    """The views ``recipe`` draws: its crop scale (unless ``min_scale``) and its tokenizer's filter."""
    min_scale = RECIPES[recipe]["min_scale"] if min_scale is None else min_scale
    return ViewRecipe(views=views, seed=seed, target_jitter=target_jitter, scale=(min_scale, 1.0),
                      interp=RECIPES[recipe]["tokenizer_filter"], recipe=recipe)


def normalisation_note(recipe: str, mean, std) -> str | None:
    """A line where the model input's normalisation (``mean``, ``std``) is not the one of the
    recipe the targets were made for (a token file records its recipe, not a normalisation: the
    tokenizer saw [0,1] pixels); None where it is."""
    paper = RECIPES[recipe]
    if (tuple(mean), tuple(std)) == (paper["mean"], paper["std"]):
        return None
    return (f"the model's input is normalised with mean {_three(mean)} and std {_three(std)}, not with the "
            f"{_three(paper['mean'])} and {_three(paper['std'])} of the {recipe} recipe the tokens were made for; "
            "the export records yours, so fine-tune with them")


def _three(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
