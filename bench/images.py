"""Fixed, seeded benchmark images: documents, charts and photo-like pictures, sent as nv-ingest sends them.

    python -m bench.images --count 6 --size 640x480 --out /tmp/bench-images   # writes PNGs, prints tiles

Each image is drawn from its own seed (base seed + index), so image i is the same in every run and
on every machine, and no two indices share pixels (the caption cache sees distinct images). The
payload is `client.encode_png_within`: RGB PNG, shrunk with Lanczos until its base64 form fits
180,000 characters, exactly like nv-ingest. Shrinking keeps the aspect ratio to within a pixel, and
the tile count depends on the aspect ratio, so `--size` controls it: 512x512 -> 1 tile, 640x480
(4:3) -> 13 tiles at MAX_NUM_TILES=12 (12 + thumbnail).
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if __package__ in (None, ""):  # `python bench/images.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import MAX_BASE64_CHARS, encode_png_within  # noqa: E402

KINDS = ("document", "chart", "photo")
_WORDS = ("revenue quarter total growth market report figure table summary annual cost margin region "
          "product sales index value share data model result analysis segment forecast budget plan "
          "customer service network energy supply demand price volume rate ratio level").split()


@dataclass(frozen=True)
class BenchImage:
    index: int
    kind: str
    width: int  # of the encoded PNG, after any shrinking
    height: int
    tiles: int  # at max_num_tiles, thumbnail included
    b64: str

    @property
    def data_url(self) -> str:
        return f"data:image/png;base64,{self.b64}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: same glyphs everywhere
    except (OSError, TypeError):
        return ImageFont.load_default()


def draw_document(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    size = max(10, height // 40)
    margin = width // 12
    title = " ".join(rng.choice(_WORDS, 3)).title()
    draw.text((margin, margin // 2), title, fill=(0, 0, 0), font=_font(int(size * 1.6)))
    y = margin // 2 + int(size * 3)
    font = _font(size)
    while y < height - margin:
        if rng.random() < 0.12:  # paragraph break
            y += size
            continue
        words, line = [], ""
        while True:
            candidate = (line + " " + str(rng.choice(_WORDS))).strip()
            if draw.textlength(candidate, font=font) > width - 2 * margin:
                break
            line = candidate
            words.append(candidate)
        draw.text((margin, y), line, fill=(20, 20, 20), font=font)
        y += int(size * 1.5)
    return image


def draw_chart(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = width // 8, width - width // 20, height // 10, height - height // 8
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=2)
    font = _font(max(10, height // 40))
    n = int(rng.integers(4, 10))
    values = rng.uniform(0.1, 1.0, n)
    step = (right - left) / n
    if rng.random() < 0.5:  # bar chart
        for i, v in enumerate(values):
            x0 = left + i * step + step * 0.15
            color = tuple(int(c) for c in rng.integers(30, 220, 3))
            draw.rectangle([x0, bottom - v * (bottom - top), x0 + step * 0.7, bottom - 1], fill=color)
            draw.text((x0, bottom + 4), str(rng.choice(_WORDS))[:6], fill=(0, 0, 0), font=font)
    else:  # line chart
        points = [(left + (i + 0.5) * step, bottom - v * (bottom - top)) for i, v in enumerate(values)]
        draw.line(points, fill=(200, 40, 40), width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(40, 40, 200))
    for k in range(5):  # y-axis ticks with labels
        y = bottom - k * (bottom - top) / 4
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{k * 25}", fill=(0, 0, 0), font=font)
    draw.text((left, 4), " ".join(rng.choice(_WORDS, 2)).title(), fill=(0, 0, 0), font=_font(max(12, height // 30)))
    return image


def draw_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradients, soft blobs and sensor-like noise: compresses like a photograph, not like a drawing."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(angle) + y * math.sin(angle))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    pixels = c0 + (c1 - c0) * t[..., None]
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        pixels += blob[..., None] * (rng.uniform(-120, 120, 3))
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(0.6))


_DRAW = {"document": draw_document, "chart": draw_chart, "photo": draw_photo}


def make_image(index: int, width: int, height: int, kinds: tuple[str, ...] = KINDS, seed: int = 0,
               max_num_tiles: int = 12, max_chars: int = MAX_BASE64_CHARS) -> BenchImage:
    kind = kinds[index % len(kinds)]
    rng = np.random.default_rng([seed, index])
    picture = _DRAW[kind](width, height, rng)
    b64 = encode_png_within(picture, max_chars)
    with Image.open(io.BytesIO(base64.b64decode(b64))) as encoded:
        w, h = encoded.size
    return BenchImage(index, kind, w, h, tile_count(w, h, max_num_tiles), b64)


def make_images(count: int, width: int = 512, height: int = 512, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                max_num_tiles: int = 12) -> list[BenchImage]:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown image kinds {sorted(unknown)}; choose from {KINDS}")
    return [make_image(i, width, height, kinds, seed, max_num_tiles) for i in range(count)]


def tile_count(width: int, height: int, max_num_tiles: int = 12) -> int:
    from model.tiling import num_tiles  # the service's own tiling rule (imports torch: only when asked)

    return num_tiles(width, height, max_num_tiles)


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, not {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError("the service refuses images under 32x32")
    return w, h


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS):
        raise argparse.ArgumentTypeError(f"kinds must be a comma list of {','.join(KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WIDTHxHEIGHT before encoding")
    parser.add_argument("--kinds", type=parse_kinds, default=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-tiles", type=int, default=12)
    parser.add_argument("--out", type=Path, help="write image-<i>-<kind>.png files here")
    args = parser.parse_args(argv)
    images = make_images(args.count, *args.size, args.kinds, args.seed, args.max_num_tiles)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for im in images:
        print(f"{im.index:4d} {im.kind:9s} {im.width}x{im.height} tiles={im.tiles} base64_chars={len(im.b64)}")
        if args.out:
            (args.out / f"image-{im.index:04d}-{im.kind}.png").write_bytes(base64.b64decode(im.b64))
    return 0


if __name__ == "__main__":
    sys.exit(main())
