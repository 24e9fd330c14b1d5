"""Image URLs to RGB Pillow images, in the API-server process, with every failure named.

nv-ingest sends `data:image/png;base64,...`; the `openai` client and curl users send PNG or JPEG
data URLs too; `http(s)://` URLs are fetched only when the operator allows it (service/remote_images.py).
Anything else is refused with a message that says what was wrong, never echoing the payload back.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import ImageError, shown
from service.remote_images import REMOTE_DISABLED, RemoteImagePolicy, fetch_image

SUPPORTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_MIME_ALIASES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG"}


# Pillow's bomb guard is one process-wide limit, and each request has its own (what is left of its
# pixel budget), checked exactly on every header below before any pixel is decoded. A global set per
# request would race between the threads that decode images, and refuse the tiles of others.
Image.MAX_IMAGE_PIXELS = None


def image_from_url(url: str, max_pixels: int, policy: RemoteImagePolicy,
                   limit_name: str = "MAX_IMAGE_PIXELS") -> Image.Image:
    """Every image URL of a request: a data URL decoded, an http(s) URL fetched per the policy, then decoded.
    `max_pixels` (named `limit_name` in errors) bounds the decoded image, checked on its header."""
    if not url.startswith(("http://", "https://")):
        return decode_data_url(url, max_pixels, limit_name)
    if not policy.enabled:
        raise ImageError(REMOTE_DISABLED)
    return decode_image_bytes(fetch_image(url, policy), max_pixels, limit_name)


def decode_data_url(url: str, max_pixels: int, limit_name: str = "MAX_IMAGE_PIXELS") -> Image.Image:
    """Decode a PNG or JPEG data URL into an RGB image (transparency flattened onto white)."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else ""
        raise ImageError(f"unsupported image URL scheme '{shown(scheme)}'; use data:image/png;base64,... or "
                         "data:image/jpeg;base64,..." if scheme else
                         "image URL is not a data URL; use data:image/png;base64,...")
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ImageError("malformed data URL: expected data:image/png;base64,<base64 data>")
    mime = (match.group("mime") or "").lower()
    if mime not in _MIME_ALIASES:
        raise ImageError(f"unsupported image type '{shown(mime) or 'none'}' in data URL; PNG and JPEG are supported")
    # MIME-style base64 wraps lines; whitespace carries no data.
    payload = "".join(url[match.end():].split())
    if not payload:
        raise ImageError("data URL carries no image data")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data is not valid base64") from None
    return decode_image_bytes(raw, max_pixels, limit_name)


def decode_image_bytes(raw: bytes, max_pixels: int, limit_name: str = "MAX_IMAGE_PIXELS") -> Image.Image:
    """`limit_name` names the setting that set `max_pixels`, for the error message."""
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageError("image data is not a PNG or JPEG image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt headers
        raise ImageError(f"image header is corrupt ({type(exc).__name__})") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageError(f"image format {image.format} is not supported; send PNG or JPEG")
    width, height = image.size
    # Checked on the header, before any pixel is decoded: a small file can declare a huge canvas.
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{max_pixels} pixels ({limit_name})")
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    try:
        image.load()  # first frame of an animated PNG
    except Exception:  # noqa: BLE001 - truncated data surfaces as OSError, SyntaxError, ...
        raise ImageError(f"{image.format} image data is truncated or corrupt") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha is composited onto white, 16-bit is scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
