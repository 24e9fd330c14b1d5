import base64

import pytest

from service.errors import ImageError
from service.images import decode_data_url
from tests.helpers import data_url, png_bytes


def test_alpha_is_flattened_onto_white():
    image = decode_data_url(data_url(png_bytes(4, 4, (0, 0, 0, 0), mode="RGBA")), 10**6)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    image = decode_data_url(data_url(png_bytes(4, 4, 32768, mode="I;16")), 10**6)
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        decode_data_url(data_url(png_bytes(100, 100)), max_pixels=9_999)


@pytest.mark.parametrize("url,fragment", [
    ("data:image/png;base64,%%%", "not valid base64"),
    ("http://example.com/x.png", "unsupported image URL scheme 'http'"),
    ("s3://bucket/x.png", "unsupported image URL scheme 's3'"),
    ("data:image/webp;base64,AAAA", "unsupported image type 'image/webp'"),
    (data_url(b"GIF89a not really"), "not a PNG or JPEG"),
])
def test_errors_name_the_problem(url, fragment):
    with pytest.raises(ImageError, match=fragment):
        decode_data_url(url, 10**6)


def test_jpeg_is_accepted():
    raw = png_bytes(8, 8, (10, 200, 10), fmt="JPEG")
    assert decode_data_url(f"data:image/jpeg;base64,{base64.b64encode(raw).decode()}", 10**6).size == (8, 8)


def test_pixel_limit_above_pillows_default_is_honoured():
    # Pillow refuses above ~179M pixels by default; our limit must be the one that counts.
    import struct
    import zlib

    raw = bytearray(png_bytes(8, 8))
    raw[16:24] = struct.pack(">II", 10_000, 10_000)  # IHDR width and height: 100M pixels
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        decode_data_url(data_url(bytes(raw)), max_pixels=50_000_000)
    with pytest.raises(ImageError, match="truncated or corrupt"):  # allowed size: fails later, on the data
        decode_data_url(data_url(bytes(raw)), max_pixels=200_000_000)


def test_one_image_s_small_budget_does_not_limit_other_images():
    """Budgets are per request: the threads that decode and tile other requests' images never see it."""
    from PIL import Image

    from service.images import decode_image_bytes
    from model.tiling import tile_image

    with pytest.raises(ImageError, match="over the limit of 100 pixels"):
        decode_image_bytes(png_bytes(64, 48), 100)
    assert len(tile_image(Image.new("RGB", (640, 480)), 12)) == 13
