from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.runner import normalize_tiles
from model.tiling import choose_grid, num_tiles, tile_image
from service.jobs import to_input

REFERENCE_12 = [((1920, 1080), 9), ((640, 480), 13), ((481, 202), 11), ((2775, 4190), 7), ((1024, 1024), 5)]


@pytest.mark.parametrize(("size", "expected"), REFERENCE_12)
def test_reference_tile_counts_at_12(size, expected):
    assert num_tiles(*size, max_num_tiles=12) == expected
    assert len(tile_image(Image.new("RGB", size), 12)) == expected


@pytest.mark.parametrize(("size", "_"), REFERENCE_12)
def test_max_num_tiles_1_is_one_tile_without_thumbnail(size, _):
    assert num_tiles(*size, max_num_tiles=1) == 1
    tiles = tile_image(Image.new("RGB", size), 1)
    assert len(tiles) == 1 and tiles[0].size == (512, 512)


def test_grid_follows_aspect_ratio_and_tie_rule():
    assert choose_grid(1920, 1080, 12) == (4, 2)
    assert choose_grid(640, 480, 12) == (4, 3)
    # A square image ties between 1x1, 2x2 and 3x3: a small one stays 1x1, a large one takes the larger grid.
    assert choose_grid(300, 300, 12) == (1, 1)
    assert choose_grid(1024, 1024, 12) == (2, 2)
    assert choose_grid(5000, 5000, 12) == (3, 3)
    assert choose_grid(100, 3000, 12) == (1, 12)


def test_tiles_are_row_major_crops_of_the_resized_image_plus_thumbnail():
    # Left half red, right half blue: a 2x1 grid puts red in tile 0 and blue in tile 1.
    array = np.zeros((512, 1024, 3), dtype=np.uint8)
    array[:, :512, 0] = 255
    array[:, 512:, 2] = 255
    tiles = tile_image(Image.fromarray(array), 12)
    assert len(tiles) == 3 and all(t.size == (512, 512) for t in tiles)
    assert np.asarray(tiles[0])[256, 100].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[256, 400].tolist() == [0, 0, 255]
    thumb = np.asarray(tiles[2])
    assert thumb[256, 10].tolist() == [255, 0, 0] and thumb[256, 500].tolist() == [0, 0, 255]


def test_normalisation_scales_to_unit_then_uses_mean_and_std():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    white = torch.from_numpy(to_input(Image.new("RGB", (512, 512), (255, 255, 255)), 12).tiles)
    tensor = normalize_tiles(white, mean, std)
    assert tensor.shape == (1, 3, 512, 512) and tensor.dtype == torch.float32
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([1.0, 3.0, 1.0])
    tiles = torch.from_numpy(to_input(Image.new("RGB", (640, 480)), 12).tiles)
    assert normalize_tiles(tiles, mean, std).shape == (13, 3, 512, 512)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        choose_grid(0, 10, 12)
    with pytest.raises(ValueError):
        choose_grid(10, 10, 0)
