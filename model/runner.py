"""The real model behind the engine's `ModelRunner` interface.

Prompts are tokenised with the checkpoint's chat template; the tiles of every request that starts
its prefill in a step go through the vision encoder together; chunks and decoding steps run on the
slot pool (model/forward.py). On a GPU the pool is sized from free memory after a warm-up that
measures what one largest request needs on top of the weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.request import EngineRequest, ImageInput
from engine.runner import PrefillChunk, Prompt
from model.architecture import NemotronNanoVLV2
from model.detokenize import TokenText
from model.forward import SlotForward
from model.kernels.check import check_kernels
from model.loader import load_model
from model.prompt import PromptBuilder, image_tokens_for, token_id
from model.state_pool import PoolShape, StatePool

log = logging.getLogger(__name__)
GIB = 1024**3


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _generation_config(path: Path | None) -> dict:
    file = path / "generation_config.json" if path else None
    return json.loads(file.read_text()) if file and file.is_file() else {}


def eos_token_ids(model: NemotronNanoVLV2, tokenizer, path: Path | None) -> frozenset[int]:
    ids = set(_as_list(model.config.text_config.eos_token_id))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids |= set(_as_list(_generation_config(path).get("eos_token_id")))
    return frozenset(ids)


def sampling_defaults(path: Path | None) -> tuple[float, float]:
    """temperature and top_p from generation_config.json, as vLLM applies them; 1.0 where absent."""
    config = _generation_config(path)
    return float(config.get("temperature", 1.0)), float(config.get("top_p", 1.0))


@dataclass
class _Payload:
    input_ids: list[int]
    images: list[ImageInput]
    embeds: torch.Tensor | None = None  # (prompt tokens, hidden), image features in place, once encoded


class NemotronRunner:
    def __init__(self, model: NemotronNanoVLV2, tokenizer, num_slots: int, max_seq_len: int,
                 ssm_dtype: torch.dtype = torch.float32, model_path: Path | None = None, enforce_eager: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        cfg = self.config = model.config
        self.device = model.mlp1.linear_1.weight.device
        self.dtype = model.mlp1.linear_1.weight.dtype
        self.ssm_dtype = ssm_dtype
        # CUDA graphs only on a GPU: on a CPU there are no launches to save.
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        log.info(check_kernels(self.device, self.dtype))
        self.image_tokens = image_tokens_for(cfg, tokenizer)
        self.prompts = PromptBuilder(tokenizer, self.image_tokens)
        self.eos_ids = eos_token_ids(model, tokenizer, model_path)
        self.think_ids = (token_id(tokenizer, "<think>"), token_id(tokenizer, "</think>"))
        self.sampling_defaults = sampling_defaults(model_path)
        self.allocate(num_slots, max_seq_len, graphs="none" if num_slots == 1 else "all")

    def allocate(self, num_slots: int, max_seq_len: int, graph_batch: int | None = None,
                 graphs: str = "all") -> None:
        """A fresh pool of `num_slots` slots; on a GPU also the decoding graphs, for batches up to
        `graph_batch` (default: the slot count). graphs: "all", "largest" (to measure memory) or "none"."""
        self.pool = self.forward = None  # free the old pool and graphs before the new ones take their place
        self.pool = StatePool(self.config.text_config, num_slots, max_seq_len, self.dtype, self.ssm_dtype,
                              self.device)
        self.forward = SlotForward(self.model.language_model, self.pool)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        if self.use_graphs and graphs != "none":
            from model.cuda_graphs import DecodeGraphs

            self.forward.graphs = DecodeGraphs(self.forward, graph_batch or num_slots, graphs == "largest")

    # ---- ModelRunner ---------------------------------------------------------------------------

    def prepare(self, request: EngineRequest) -> Prompt:
        prompt = self.prompts.build(request)  # whether it fits the slot, the engine checks with max_tokens
        text = TokenText(self.tokenizer, prompt.reasoning, *self.think_ids)
        return Prompt(len(prompt.input_ids), self.eos_ids, text, _Payload(prompt.input_ids, request.images))

    @torch.inference_mode()
    def encode_images(self, prompts: list[Prompt]) -> None:
        images = [image for p in prompts for image in p.payload.images]
        features = self._encode([image.tiles for image in images]) if images else None
        offset = 0
        for prompt in prompts:
            payload = prompt.payload
            ids = torch.tensor(payload.input_ids, dtype=torch.long, device=self.device)
            embeds = self.model.embed_tokens(ids)
            count = sum(image.num_tiles for image in payload.images) * self.config.tokens_per_tile
            if count:
                embeds[ids == self.image_tokens.context_id] = features[offset:offset + count].to(embeds.dtype)
                offset += count
            payload.embeds, payload.images = embeds, []  # the tiles are no longer needed

    def _encode(self, tiles: list[np.ndarray]) -> torch.Tensor:
        """uint8 (n, side, side, 3) tiles -> normalised pixels on the device -> image token embeddings."""
        pixels = torch.from_numpy(np.concatenate(tiles)).to(self.device)
        return self.model.encode_tiles(normalize_tiles(pixels, self.config.norm_mean, self.config.norm_std))

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        embeds = [c.prompt.payload.embeds[c.start:c.end] for c in chunks]
        logits = self.forward.prefill([c.slot for c in chunks], embeds, [c.start for c in chunks])
        for chunk in chunks:
            if chunk.completes:
                chunk.prompt.payload.embeds = None
        return logits

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self.forward.decode(slots, tokens)

    def release(self, slot: int) -> None:
        pass  # the next sequence in this slot resets it when its prefill starts

    # ---- sizing ---------------------------------------------------------------------------------

    def slot_bytes(self, max_seq_len: int) -> int:
        return PoolShape.of(self.config.text_config).bytes_per_slot(max_seq_len, self.dtype, self.ssm_dtype)


def size_pool_on_gpu(runner: NemotronRunner, max_slots: int, max_seq_len: int, memory_fraction: float,
                     warm_up) -> int:
    """Slots that fit in `memory_fraction` of the GPU once the weights and one largest request's
    activations (measured by `warm_up`, run on a one-slot pool) are accounted for."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.allocate(1, max_seq_len, graph_batch=max_slots, graphs="largest")  # the graphs' memory counts too
    warm_up()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    one_slot = runner.slot_bytes(max_seq_len)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # What this process needs at peak beyond the pool, and what other processes leave free.
    fixed = peak - one_slot
    held_here = torch.cuda.memory_allocated(device)
    budget = min(total * memory_fraction - fixed, free + held_here - fixed - total * (1 - memory_fraction))
    slots = int(budget // one_slot)
    log.info("GPU memory: %.1f GiB total, %.1f GiB free, %.1f GiB for weights and activations at peak, %.2f GiB "
             "per slot of %d tokens: room for %d slots at GPU_MEMORY_UTILIZATION=%.2f", total / GIB, free / GIB,
             fixed / GIB, one_slot / GIB, max_seq_len, slots, memory_fraction)
    return min(max_slots, slots)


def load_runner(model_id: str, revision: str | None, device: str, dtype: str, num_slots: int, max_seq_len: int,
                ssm_dtype: str = "float32", load_format: str = "safetensors",
                enforce_eager: bool = False, quantization: str = "auto") -> NemotronRunner:
    model, tokenizer, path = load_model(model_id, revision, device, dtype, load_format, quantization)
    state_dtype = getattr(torch, ssm_dtype)
    return NemotronRunner(model, tokenizer, num_slots, max_seq_len, state_dtype, path, enforce_eager)


def normalize_tiles(
    tiles: torch.Tensor, norm_mean: tuple[float, float, float], norm_std: tuple[float, float, float]
) -> torch.Tensor:
    """uint8 tiles (n, H, W, 3), on any device -> (n, 3, H, W) float32, scaled to [0, 1] then normalised
    per channel (the worker does this on the GPU: only uint8 tiles cross from the API server)."""
    mean = torch.tensor(norm_mean, dtype=torch.float32, device=tiles.device)[:, None, None]
    std = torch.tensor(norm_std, dtype=torch.float32, device=tiles.device)[:, None, None]
    return (tiles.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
