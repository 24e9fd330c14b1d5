"""InternVL-style dynamic tiling, as the official `NemotronNanoVLV2ImageProcessor` does, without torchvision.

Pure functions of (image, settings): the API-server process tiles, the worker normalises the uint8
tiles (`normalize_tiles`). Resizes are PIL bicubic (torchvision's Resize on PIL images calls the same
PIL resize).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

TILE_SIZE = 512
IMAGE_TOKENS_PER_TILE = 256  # 32 x 32 patches of 16 pixels, pixel shuffle 0.5
DEFAULT_MAX_NUM_TILES = 12


@lru_cache(maxsize=64)
def candidate_grids(max_num_tiles: int, min_num_tiles: int = 1) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min <= cols*rows <= max, ordered by tile count (stable within a count)."""
    grids = {
        (i, j)
        for n in range(min_num_tiles, max_num_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num_tiles <= i * j <= max_num_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, max_num_tiles: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; on a tie the later (larger) grid wins
    only when the image covers more than half of that grid's pixel area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_num_tiles < 1:
        raise ValueError("max_num_tiles must be >= 1")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_num_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, max_num_tiles: int, use_thumbnail: bool = True, tile_size: int = TILE_SIZE) -> int:
    cols, rows = choose_grid(width, height, max_num_tiles, tile_size)
    count = cols * rows
    return count + 1 if use_thumbnail and count > 1 else count


def tile_image(
    image: Image.Image, max_num_tiles: int, use_thumbnail: bool = True, tile_size: int = TILE_SIZE
) -> list[Image.Image]:
    """Resize to the chosen grid, cut row-major tiles, append a whole-image thumbnail when > 1 tile."""
    image = image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, max_num_tiles, tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(
    tiles: torch.Tensor, norm_mean: tuple[float, float, float], norm_std: tuple[float, float, float]
) -> torch.Tensor:
    """uint8 tiles (n, H, W, 3), on any device -> (n, 3, H, W) float32, scaled to [0, 1] then normalised
    per channel (the worker does this on the GPU: only uint8 tiles cross from the API server)."""
    mean = torch.tensor(norm_mean, dtype=torch.float32, device=tiles.device)[:, None, None]
    std = torch.tensor(norm_std, dtype=torch.float32, device=tiles.device)[:, None, None]
    return (tiles.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
