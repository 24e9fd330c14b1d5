"""Reference client and smoke test: caption images through the service, as nv-ingest does.

    python client.py page1.png chart.jpg --concurrency 8

Each image is flattened to RGB, re-encoded as PNG and shrunk until its base64 form fits nv-ingest's
180,000-character budget, then sent as one `POST /v1/chat/completions`. Captions print in input
order (`path: caption` when there are several). Any failure exits non-zero with a readable message.
"""

from __future__ import annotations

import argparse
import base64
import io
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


def encode_png_within(image: Image.Image, max_chars: int = MAX_BASE64_CHARS) -> str:
    """PNG base64 of `image`, shrunk with Lanczos (0.9, then x0.95 a pass) until it fits, like nv-ingest."""
    image = image.convert("RGB")
    scale = 1.0
    current = image
    while True:
        buf = io.BytesIO()
        current.save(buf, format="PNG")
        encoded = base64.b64encode(buf.getvalue()).decode("ascii")
        if len(encoded) <= max_chars or min(current.size) <= 1:
            return encoded
        scale = 0.9 if scale == 1.0 else scale * 0.95
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        current = image.resize(size, Image.LANCZOS)


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB as the service sees it: transparent pixels become white, not whatever colour they hide."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str) -> str:
    try:
        with Image.open(path) as image:
            return encode_png_within(flatten_on_white(image))
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
            if response.status_code not in RETRY_STATUSES or attempt == retries:
                raise ClientError(f"HTTP {response.status_code}: {_error_message(response)}")
        time.sleep(min(2 ** attempt, 8))
    raise AssertionError("unreachable")


def _error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Caption images with the Nemotron Nano VL caption service.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--api-key", default=os.environ.get("NGC_API_KEY") or os.environ.get("NVIDIA_API_KEY"),
                        help="bearer key (default: $NGC_API_KEY, then $NVIDIA_API_KEY)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="Caption the content of this image:")
    parser.add_argument("--system-prompt", default="/no_think")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(1, args.concurrency))
    session.mount("http://", adapter)
    session.mount("https://", adapter)

    def one(path: str) -> str:
        body = build_request(load_image(path), args.prompt, args.system_prompt, args.max_tokens, args.model)
        return caption(session, args.url, body, args.api_key)

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
