"""Build the engine for the real model: load the checkpoint, size the slot pool, warm up.

On a GPU the number of slots comes from free memory (GPU_MEMORY_UTILIZATION) once a warm-up of one
largest request (MAX_NUM_TILES tiles plus thumbnail) has shown what it needs beyond the weights.
The service refuses to start when not even one such request fits.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImageInput, ImagePart, Message, SamplingParams, TextPart
from model.runner import GIB, NemotronRunner, load_runner, size_pool_on_gpu
from model.tiling import TILE_SIZE

log = logging.getLogger(__name__)


def random_image(tiles: int, seed: int = 0) -> ImageInput:
    """An image already cut into `tiles` tiles (the last one the thumbnail), random pixels, seeded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (tiles, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
    return ImageInput(pixels, TILE_SIZE * max(1, tiles - 1), TILE_SIZE)


def largest_request(max_num_tiles: int, max_tokens: int = 2) -> EngineRequest:
    """One image cut into the most tiles the server allows (plus the thumbnail), random pixels."""
    image = random_image(max_num_tiles + 1 if max_num_tiles > 1 else 1)
    user = Message("user", [ImagePart(image), TextPart("Caption the content of this image:")])
    return EngineRequest("warm-up", [user], SamplingParams(max_tokens=max_tokens, temperature=0.0))


def run_to_end(engine: LLMEngine, request: EngineRequest) -> list:
    engine.add_request(request)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    errors = [o.error for o in outputs if o.error is not None]
    if errors:
        raise RuntimeError(errors[0].message)
    return outputs


class DoesNotFit(RuntimeError):
    pass


def build_engine(runner: NemotronRunner, max_running: int, max_seq_len: int, max_prefill_tokens: int,
                 max_num_tiles: int, memory_fraction: float) -> LLMEngine:
    warm = largest_request(max_num_tiles)
    if runner.device.type == "cuda":
        slots = size_pool_on_gpu(runner, max_running, max_seq_len, memory_fraction,
                                 lambda: run_to_end(LLMEngine(runner, 1, max_prefill_tokens), warm))
        if slots < 1:
            raise DoesNotFit(f"not even one sequence of MAX_MODEL_LEN={max_seq_len} tokens fits in "
                             f"GPU_MEMORY_UTILIZATION={memory_fraction} of this GPU next to the model: lower "
                             "MAX_MODEL_LEN or MAX_NUM_TILES, or raise GPU_MEMORY_UTILIZATION")
    else:
        slots = max_running
    runner.allocate(slots, max_seq_len)
    engine = LLMEngine(runner, max_running, max_prefill_tokens)
    try:
        run_to_end(engine, warm)
    except RuntimeError as exc:
        raise DoesNotFit(f"one {warm.tiles}-tile request does not fit (MAX_NUM_TILES={max_num_tiles}, "
                         f"MAX_MODEL_LEN={max_seq_len}): {exc}") from None
    log.info("state pool: %d slots of %d tokens (%.2f GiB); the largest request that fits holds %d tokens, "
             "prompt plus max_tokens", slots, max_seq_len, slots * runner.slot_bytes(max_seq_len) / GIB, max_seq_len)
    return engine


def load_engine(model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                max_num_tiles: int = 12, max_running: int = 8, max_seq_len: int = 16384,
                max_prefill_tokens: int = 2048, ssm_dtype: str = "float32",
                memory_fraction: float = 0.9, load_format: str = "safetensors",
                enforce_eager: bool = False, quantization: str = "auto") -> LLMEngine:
    """Load the checkpoint (downloading it if needed) and return an engine ready for requests."""
    runner = load_runner(model_id, revision, device, dtype, 1, max_seq_len, ssm_dtype, load_format, enforce_eager,
                         quantization)
    return build_engine(runner, max_running, max_seq_len, max_prefill_tokens, max_num_tiles, memory_fraction)
