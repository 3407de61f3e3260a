import math

import numpy as np
import pytest

from beit_common import BeitDataError
from beit_data.views import ViewRecipe, sample_view, sample_views

RECIPE = ViewRecipe(views=10, seed=7)


def test_windows_stay_inside_and_in_range_or_fall_back():
    rng = np.random.default_rng(0)
    fallbacks = 0
    for i in range(3000):
        width, height = (int(v) for v in rng.integers(1, 900, size=2))
        v = sample_view(RECIPE, f"{i:09d}", int(rng.integers(0, 10)), width, height)
        assert 0 <= v.x and 0 <= v.y and v.w >= 1 and v.h >= 1
        assert v.x + v.w <= width and v.y + v.h <= height
        if v.fallback:
            fallbacks += 1
            assert (v.x, v.y) == ((width - v.w) // 2, (height - v.h) // 2)
            continue
        area = v.w * v.h / (width * height)
        # w and h are rounded to integers, so the bounds hold up to one pixel per side
        slack = (v.w + v.h + 1) / (width * height)
        assert 0.08 - slack <= area <= 1 + slack
        ratio = v.w / v.h
        assert 3 / 4 * (1 - 1 / v.h) - 1 / v.h <= ratio <= 4 / 3 * (1 + 1 / v.h) + 1 / v.h
        assert 0.6 <= v.brightness <= 1.4 and 0.6 <= v.contrast <= 1.4 and 0.6 <= v.saturation <= 1.4
    assert 0 < fallbacks < 3000  # very thin images fall back, ordinary ones do not


def test_distribution_matches_random_resized_crop():
    views = [sample_view(RECIPE, str(k), 0, 600, 600) for k in range(4000)]
    scales = np.array([v.w * v.h / (600 * 600) for v in views if not v.fallback])
    log_ratios = np.log([v.w / v.h for v in views if not v.fallback])
    assert scales.min() < 0.1 and scales.max() > 0.95
    assert abs(np.median(log_ratios)) < 0.03
    assert abs(np.mean([v.flip for v in views]) - 0.5) < 0.03
    assert abs(np.mean([v.brightness for v in views]) - 1.0) < 0.02


def test_pure_function_of_seed_key_view_and_size():
    a = sample_views(RECIPE, "000000001", 500, 375)
    assert a == sample_views(RECIPE, "000000001", 500, 375)
    assert a != sample_views(RECIPE, "000000002", 500, 375)
    assert a != sample_views(ViewRecipe(views=10, seed=8), "000000001", 500, 375)
    assert len({(v.x, v.y, v.w, v.h) for v in a}) == 10
    plain = sample_views(ViewRecipe(views=10, seed=7, target_jitter=False), "000000001", 500, 375)
    assert [(v.x, v.y, v.w, v.h, v.flip) for v in plain] == [(v.x, v.y, v.w, v.h, v.flip) for v in a]
    assert all((v.brightness, v.contrast, v.saturation) == (1.0, 1.0, 1.0) for v in plain)


def test_bad_recipes_are_refused():
    with pytest.raises(BeitDataError):
        ViewRecipe(views=0)
    with pytest.raises(BeitDataError):
        ViewRecipe(scale=(0.5, 0.2))
    with pytest.raises(BeitDataError):
        sample_view(RECIPE, "k", 0, 0, 10)
    assert math.isclose(RECIPE.ratio[0], 0.75)


def test_a_views_geometry_one_way_and_back():
    """A token row's view, its roi row for DALI, whether it lies inside its image, a centred window."""
    from beit_data.tokens import view_rows
    from beit_data.views import View, centre_view, outside_image, roi, row_view

    views = [View(3, 4, 20, 10, True, 1.25, 0.75, 1.0), View(0, 0, 40, 30, False, 1.0, 1.0, 1.0)]
    assert [row_view(row) for row in view_rows("k", views, 40, 30)] == views
    assert roi(views).dtype == np.float32 and roi(views).tolist() == [[3, 4, 23, 14], [0, 0, 40, 30]]
    assert roi([]).shape == (0,)
    x, y, w, h = (np.array(c) for c in zip(*[(0, 0, 40, 30), (1, 0, 40, 30), (-1, 0, 5, 5), (0, 0, 0, 5),
                                             (35, 25, 5, 5), (0, 26, 5, 5)]))
    assert outside_image(x, y, w, h, 40, 30).tolist() == [False, True, True, True, False, True]
    assert not outside_image(3, 4, 20, 10, 40, 30)
    assert centre_view(256, 100, 224 / 256) == View(84, 6, 88, 88, False, 1.0, 1.0, 1.0)
    assert centre_view(1, 1, 0.1) == View(0, 0, 1, 1, False, 1.0, 1.0, 1.0)
