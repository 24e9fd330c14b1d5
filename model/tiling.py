"""InternVL-style dynamic tiling, as the official `NemotronNanoVLV2ImageProcessor` does, without torchvision.

Pure functions of (image, settings), without torch: the API-server processes tile, and the worker
normalises the uint8 tiles on its device (`model/runner.py`). Resizes are PIL bicubic (torchvision's
Resize on PIL images calls the same PIL resize). A whole-image thumbnail follows the tiles whenever
there are several, as the checkpoint's `use_thumbnail: true` asks (the loader refuses any other value).
"""

from __future__ import annotations

from functools import lru_cache

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


def num_tiles(width: int, height: int, max_num_tiles: int, tile_size: int = TILE_SIZE) -> int:
    """Tiles the image is cut into, thumbnail included (what `tile_image` returns, without cutting)."""
    cols, rows = choose_grid(width, height, max_num_tiles, tile_size)
    return cols * rows + has_thumbnail(cols * rows)


def has_thumbnail(grid_tiles: int) -> bool:
    return grid_tiles > 1


def tile_image(image: Image.Image, max_num_tiles: int, tile_size: int = TILE_SIZE) -> list[Image.Image]:
    """Resize to the chosen grid, cut row-major tiles, append a whole-image thumbnail when > 1 tile."""
    image = image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, max_num_tiles, tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if has_thumbnail(len(tiles)):
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles
