import numpy as np
import pytest
from scipy import ndimage

from beit_data.masking import BlockMaskGenerator


def test_shape_dtype_and_determinism():
    gen = BlockMaskGenerator()
    a = gen(np.random.default_rng(3))
    assert a.shape == (14, 14) and a.dtype == bool
    assert np.array_equal(a, gen(np.random.default_rng(3)))
    assert not np.array_equal(a, gen(np.random.default_rng(4)))


def test_distribution_of_masked_counts():
    gen = BlockMaskGenerator(grid=(14, 14), num_masked=75, min_block=16, min_aspect=0.3)
    masks = np.stack([gen(np.random.default_rng(i)) for i in range(3000)])
    counts = masks.reshape(len(masks), -1).sum(1)
    # Blocks never overshoot the budget; most masks hit it exactly, the rest stop when no block fits.
    assert counts.max() == 75
    assert 0.5 < (counts == 75).mean() < 0.9
    assert 73 < counts.mean() < 75
    assert np.percentile(counts, 1) >= 55
    # Every patch position gets masked sometimes, the centre more often than the corners.
    freq = masks.mean(0)
    assert freq.min() > 0.02 and freq[6:8, 6:8].mean() > freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean()


def test_masks_are_made_of_blocks():
    gen = BlockMaskGenerator()
    sizes = []
    for i in range(300):
        labels, n = ndimage.label(gen(np.random.default_rng(i)))
        sizes += [int((labels == k).sum()) for k in range(1, n + 1)]
    # Connected masked regions are unions of blocks of at least min_block patches, except for
    # the remainder block that fills the last few patches of the budget.
    assert np.median(sizes) >= 16


def test_small_budget_and_bad_arguments():
    gen = BlockMaskGenerator(grid=(8, 8), num_masked=10, min_block=4)
    counts = [gen(np.random.default_rng(i)).sum() for i in range(200)]
    assert max(counts) == 10 and min(counts) >= 4
    with pytest.raises(ValueError):
        BlockMaskGenerator(grid=(4, 4), num_masked=17)
