"""Turn a validated chat request into an engine request, in the API-server process.

Every check that can fail for one request happens here, before it is queued: a bad image then
costs its own request a 400 and never reaches the engine. Images are decoded and tiled here (these
processes run in parallel), so only compact uint8 tiles cross to the inference worker.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.request import EngineRequest, ImageInput, ImagePart, Message, SamplingParams, TextPart
from engine.runner import SpecialTokenInText
from model.tiling import IMAGE_TOKENS_PER_TILE, tile_image
from service.errors import APIError, ImageError
from service.images import image_from_url
from service.protocol import ChatCompletionRequest, ImageContent
from service.remote_images import RemoteImagePolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobLimits:
    default_max_tokens: int
    max_output_tokens: int
    max_images: int
    max_image_pixels: int
    max_num_tiles: int
    max_prompt_chars: int
    max_model_len: int | None = None  # prompt plus max_tokens; refused here when image tokens alone exceed it
    max_request_pixels: int | None = None  # decoded pixels of all a request's images together
    remote_images: RemoteImagePolicy = RemoteImagePolicy()  # off unless ALLOW_REMOTE_IMAGES=1


@dataclass
class QueuedJob:
    """What the API server queues for the worker: the engine's input plus the service's bookkeeping."""

    request: EngineRequest
    job_id: int = 0  # the key under which the API server cancels it (SharedState)
    deadline: float = math.inf  # time.monotonic() after which nobody waits for the answer

    def overdue(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline


def to_input(image: Image.Image, max_num_tiles: int) -> ImageInput:
    """A decoded RGB image -> the uint8 tiles the vision encoder will see."""
    tiles = np.stack([np.asarray(tile, dtype=np.uint8) for tile in tile_image(image, max_num_tiles)])
    return ImageInput(tiles, image.width, image.height)


def build_job(request: ChatCompletionRequest, limits: JobLimits, request_id: str = "") -> EngineRequest:
    max_num_tiles = _max_num_tiles(request, limits)
    messages: list[Message] = []
    n_images = 0
    pixels_left = limits.max_request_pixels if limits.max_request_pixels is not None else math.inf
    for i, msg in enumerate(request.messages):
        role = "system" if msg.role == "developer" else msg.role
        if isinstance(msg.content, str):
            messages.append(Message(role=role, content=[TextPart(msg.content)]))
            continue
        parts = []
        for j, part in enumerate(msg.content):
            if isinstance(part, ImageContent):
                if role != "user":
                    raise APIError(400, f"images are only accepted in user messages, not in a {msg.role} "
                                        "message", param=f"messages.{i}.content.{j}", code="invalid_request")
                n_images += 1
                if n_images > limits.max_images:
                    raise APIError(400, f"too many images: at most {limits.max_images} per request "
                                        "(MAX_IMAGES_PER_REQUEST)", param=f"messages.{i}.content.{j}",
                                   code="too_many_images")
                # Each image may use what is left of the request's pixel budget, checked on its header
                # before it is decoded; it is tiled at once, so one full-size image is held at a time.
                budget, name = limits.max_image_pixels, "MAX_IMAGE_PIXELS"
                if pixels_left < budget:
                    budget, name = max(1, pixels_left), "what is left of MAX_REQUEST_PIXELS for this image"
                try:
                    image = image_from_url(part.url, budget, limits.remote_images, name)
                except ImageError as exc:
                    raise APIError(400, f"messages[{i}].content[{j}]: {exc}",
                                   param=f"messages.{i}.content.{j}.image_url", code="invalid_image") from None
                pixels_left -= image.width * image.height
                parts.append(ImagePart(to_input(image, max_num_tiles)))
            else:
                parts.append(TextPart(part.text))
        messages.append(Message(role=role, content=parts))
    for i, m in enumerate(messages):
        try:
            m.text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON allows "\ud800", no tokenizer does
            raise APIError(400, f"messages[{i}] holds text that is not valid Unicode (a lone surrogate)",
                           param=f"messages.{i}.content", code="invalid_text") from None
    prompt_chars = sum(len(m.text) for m in messages)
    if prompt_chars > limits.max_prompt_chars:
        raise APIError(400, f"the messages hold {prompt_chars} characters of text, over this server's limit of "
                            f"{limits.max_prompt_chars} (MAX_PROMPT_CHARS)", param="messages",
                       code="prompt_too_long")
    if not any(m.role == "user" for m in messages):
        raise APIError(400, "messages must contain at least one user message", param="messages",
                       code="invalid_request")
    job = EngineRequest(request_id, messages, _sampling(request, limits), priority=request.priority,
                        enable_thinking=request.enable_thinking)
    _check_fits(job, limits)
    return job


def _check_fits(job: EngineRequest, limits: JobLimits) -> None:
    """Refuse before queuing what can never fit by its images alone, which are counted exactly here for
    any engine (the whole prompt is counted by `PromptCheck` for the real model, and by the engine)."""
    if limits.max_model_len is None:
        return
    image_tokens = sum(IMAGE_TOKENS_PER_TILE * image.num_tiles + 2 for image in job.images)  # + <img> </img>
    if image_tokens + job.params.max_tokens > limits.max_model_len:
        raise APIError(400, f"this request's images alone are {image_tokens} prompt tokens; with max_tokens="
                            f"{job.params.max_tokens} that is over the {limits.max_model_len} tokens one request may "
                            "hold here (MAX_MODEL_LEN): send fewer or smaller images (or a lower "
                            "mm_processor_kwargs.max_num_tiles), or a smaller max_tokens", param="messages",
                       code="request_too_large")


def _max_num_tiles(request: ChatCompletionRequest, limits: JobLimits) -> int:
    """`mm_processor_kwargs.max_num_tiles` (1..MAX_NUM_TILES; the schema checked the type and >= 1),
    else the server's MAX_NUM_TILES."""
    asked = request.max_num_tiles
    if asked is None:
        return limits.max_num_tiles
    if not 1 <= asked <= limits.max_num_tiles:
        raise APIError(400, f"mm_processor_kwargs.max_num_tiles is {asked}; it must be an integer from 1 to "
                            f"this server's MAX_NUM_TILES ({limits.max_num_tiles})",
                       param="mm_processor_kwargs.max_num_tiles", code="invalid_max_num_tiles")
    return asked


def _sampling(request: ChatCompletionRequest, limits: JobLimits) -> SamplingParams:
    max_tokens = request.requested_max_tokens()
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_output_tokens)
    elif max_tokens > limits.max_output_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, f"{param} is {max_tokens}, over this server's limit of {limits.max_output_tokens} "
                            "(MAX_OUTPUT_TOKENS)", param=param, code="max_tokens_exceeded")
    if request.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({request.min_tokens}) is over max_tokens ({max_tokens})",
                       param="min_tokens", code="invalid_min_tokens")
    return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                          seed=request.seed, stop=list(request.stop or []), min_tokens=request.min_tokens,
                          ignore_eos=request.ignore_eos)


class PromptCheck:
    """The real model's exact prompt, measured in the API server before a request is queued: what can
    never fit (MAX_MODEL_LEN) or would forge a special token is refused here, not in the worker.

    The tokenizer is loaded on first use from the checkpoint the worker downloaded (no network). If it
    cannot be loaded, the check steps aside and the worker refuses the same requests with the same codes.
    """

    def __init__(self, model_id: str, revision: str | None, max_model_len: int):
        self.model_id, self.revision, self.max_model_len = model_id, revision, max_model_len
        self._builder = None
        self._failed = False
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._builder is None and not self._failed:
                from model.prompt import load_prompt_builder

                try:
                    self._builder = load_prompt_builder(self.model_id, self.revision)
                except Exception as exc:  # noqa: BLE001 - the worker still checks every request
                    self._failed = True
                    logger.warning("prompt check in the API server is off (%s); the worker checks alone", exc)
        return self._builder

    def __call__(self, job: EngineRequest) -> None:
        builder = self._load()
        if builder is None:
            return
        try:
            tokens = len(builder.build(job).input_ids)
        except SpecialTokenInText as exc:
            raise APIError(400, str(exc), param="messages", code=exc.code) from None
        if tokens + job.params.max_tokens > self.max_model_len:
            raise APIError(400, f"this request needs {tokens} prompt tokens plus max_tokens={job.params.max_tokens}, "
                                f"over the {self.max_model_len} tokens one request may hold here (MAX_MODEL_LEN): "
                                "send fewer or smaller images, less text, or a smaller max_tokens", param="messages",
                           code="request_too_large")
