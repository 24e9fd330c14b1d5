"""Reference client and smoke test: caption images through the service, as nv-ingest does.

    python client.py page1.png chart.jpg --concurrency 8

Each image is flattened onto white (transparent pixels become white, as the service sees them),
re-encoded as PNG and, when its base64 form is over `--max-base64-chars` (nv-ingest's 180,000 by
default; 0 = never), shrunk to about the largest size that fits, with a note on stderr. It is sent as
one `POST /v1/chat/completions`; `--url` takes the base URL (`http://host:8000`, `.../v1`) or that
endpoint. Captions print in input order (`path: caption` when there are several). Any failure exits
non-zero with a readable message.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests
from PIL import Image
from tqdm import tqdm

DEFAULT_URL = "http://localhost:8000/v1/chat/completions"
DEFAULT_MODEL = "nvidia/nemotron-nano-12b-v2-vl"
MAX_BASE64_CHARS = 180_000
RETRY_STATUSES = {429, 500, 502, 503, 504}


class ClientError(Exception):
    pass


def service_urls(url: str) -> tuple[str, str]:
    """(base URL, chat endpoint) from `http://host:8000`, `http://host:8000/v1` or `.../v1/chat/completions`."""
    base = url.strip().rstrip("/")
    if "://" not in base:  # `localhost:8000`: requests needs a scheme
        base = "http://" + base
    base = base.removesuffix("/chat/completions").removesuffix("/v1")
    return base, base + "/v1/chat/completions"


def _png_b64(image: Image.Image, compress_level: int = 6) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast integer box reduce first, then Lanczos over the last few x (same look, far less work)
    return image.resize(size, Image.LANCZOS, reducing_gap=3.0)


def shrink_to_fit(image: Image.Image, max_chars: int = MAX_BASE64_CHARS) -> tuple[str, tuple[int, int]]:
    """(PNG base64, its size) of RGB `image`, scaled down to about the largest size whose base64 fits.

    nv-ingest re-encodes at 0.9, then x0.95 a pass, from full size: seconds for a photo. Here each
    guess comes from the sizes seen so far (PNG size ~ scale**k: k = 2 for pixel count, more where
    shrinking smooths noise away), aiming 6% under the budget. It stops once a fit uses 85% of the
    budget, or after 6 tries with a fit in hand.
    """
    if max_chars <= 0:
        return _png_b64(image), image.size
    estimate = len(_png_b64(image, 1))  # zlib's fastest level: half the time on a photo, 10-30% bigger
    if estimate <= 1.5 * max_chars:  # might fit at the real level: try it
        encoded = _png_b64(image)
        if len(encoded) <= max_chars:
            return encoded, image.size
        estimate = len(encoded)
    fit, lo, hi = None, 0.0, 1.0  # fits at scale lo, too big at scale hi
    last, exponent = (1.0, estimate), 2.0
    for attempt in itertools.count():
        if fit and (len(fit[0]) >= 0.85 * max_chars or attempt >= 6):
            return fit
        scale = last[0] * (0.94 * max_chars / last[1]) ** (1 / exponent)
        if not lo < scale < hi:  # the guess left the bracket: bisect it instead
            scale = math.sqrt(lo * hi) if lo else hi / 2
        current = _scaled(image, scale)
        encoded = _png_b64(current)
        if len(encoded) != last[1]:
            exponent = min(4.0, max(1.5, math.log(len(encoded) / last[1]) / math.log(scale / last[0])))
        last = (scale, len(encoded))
        if len(encoded) <= max_chars:
            fit, lo = (encoded, current.size), scale
        elif min(current.size) <= 1:  # cannot fit at all: send the smallest
            return encoded, current.size
        else:
            hi = scale
    raise AssertionError("unreachable")


def encode_png_within(image: Image.Image, max_chars: int = MAX_BASE64_CHARS) -> str:
    """PNG base64 of `image` as RGB, shrunk (see `shrink_to_fit`) until it fits `max_chars` (0: never)."""
    return shrink_to_fit(image.convert("RGB"), max_chars)[0]


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB as the service sees it: transparent pixels become white, not whatever colour they hide."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, max_chars: int = MAX_BASE64_CHARS) -> str:
    try:
        with Image.open(path) as image:
            encoded, sent = shrink_to_fit(flatten_on_white(image), max_chars)
            if sent != image.size:  # say so: the caption describes a smaller picture than the file
                tqdm.write(f"note: {path}: {image.width}x{image.height} sent as {sent[0]}x{sent[1]} to fit "
                           f"--max-base64-chars {max_chars} (0 sends it as is)", file=sys.stderr)
            return encoded
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ClientError(f"{path}: not a readable image ({exc})") from None


def build_request(image_b64: str, prompt: str, system_prompt: str, max_tokens: int, model: str) -> dict:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": [
        {"type": "text", "text": prompt},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
    ]})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0,
            "stream": False}


def caption(session: requests.Session, url: str, body: dict, api_key: str | None, retries: int = 3,
            timeout: float = 120.0) -> str:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        try:
            response = session.post(url, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            if attempt == retries:
                raise ClientError(f"cannot reach {url}: {exc.__class__.__name__}") from None
        else:
            if response.status_code == 200:
                try:
                    return response.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError):
                    raise ClientError("the server answered 200 without a caption") from None
            if response.status_code == 404 and _error_code(response) != "model_not_found":
                raise ClientError(f"no caption service answers at {url} (HTTP 404)")
            if response.status_code not in RETRY_STATUSES or attempt == retries:
                raise ClientError(f"HTTP {response.status_code}: {_error_message(response)}")
        time.sleep(min(2 ** attempt, 8))
    raise AssertionError("unreachable")


def _error_code(response: requests.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Caption images with the Nemotron Nano VL caption service, as nv-ingest sends them.",
        epilog="Each image is flattened onto white (transparent pixels become white), re-encoded as PNG and, "
               "when its base64 form is over --max-base64-chars, shrunk to about the largest size that fits; "
               "a note on stderr says when.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="service base URL (http://host:8000 or http://host:8000/v1) or its "
                             f"/v1/chat/completions endpoint (default: {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("NGC_API_KEY") or os.environ.get("NVIDIA_API_KEY"),
                        help="bearer key (default: $NGC_API_KEY, then $NVIDIA_API_KEY)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the request's model field (default: %(default)s)")
    parser.add_argument("--prompt", default="Caption the content of this image:",
                        help="user text sent before the image (default: nv-ingest's, %(default)r)")
    parser.add_argument("--system-prompt", default="/no_think",
                        help="system message; /think turns reasoning on, '' sends none (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="caption length cap in tokens (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--max-base64-chars", type=_non_negative, default=MAX_BASE64_CHARS, metavar="N",
                        help="shrink each image until its PNG base64 fits N characters (default: %(default)s, "
                             "nv-ingest's budget); 0 sends it at its own size")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = service_urls(args.url)[1]
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(1, args.concurrency))
    session.mount("http://", adapter)
    session.mount("https://", adapter)

    def one(path: str) -> str:
        body = build_request(load_image(path, args.max_base64_chars), args.prompt, args.system_prompt,
                             args.max_tokens, args.model)
        return caption(session, url, body, args.api_key)

    results: dict[int, str] = {}
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool, \
            tqdm(total=len(args.images), unit="image", file=sys.stderr, disable=len(args.images) < 2) as bar:
        futures = {pool.submit(one, path): i for i, path in enumerate(args.images)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except ClientError as exc:
                failures.append(f"{args.images[i]}: {exc}" if not str(exc).startswith(args.images[i]) else str(exc))
            bar.update(1)
    for i, path in enumerate(args.images):
        if i in results:
            print(results[i] if len(args.images) == 1 else f"{path}: {results[i]}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
