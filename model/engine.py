"""The real inference engine: one left-padded prefill and one hand-written decode loop per LitServe batch.

Why a hand-written loop rather than `generate()`: every job keeps its own max_tokens, temperature,
top_p, seed and stop strings, finishes on its own, and streams text as soon as its tokens exist.

Batch invariance: images are encoded one image at a time (never mixed with other jobs' tiles), and
prompts are LEFT-padded with an explicit pad id and an attention mask; the native NemotronH zeroes
padded positions before and after the Mamba convolution, so padding never reaches the recurrent
state (right padding would sit between the prompt and the generated tokens and corrupt it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.architecture import NemotronNanoVLV2
from model.detokenize import IncrementalDecoder, ReasoningSplitter
from model.loader import load_model
from model.prompt import ImageTokens, Prompt, build_prompt
from model.sampling import make_generator, sample_token
from model.stops import StopMatcher
from model.tiling import DEFAULT_MAX_NUM_TILES, preprocess_image
from model.types import CaptionJob, Delta, FinishReason

log = logging.getLogger(__name__)


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_token_ids(model: NemotronNanoVLV2, tokenizer, path: Path | None) -> set[int]:
    ids = set(_as_list(model.config.text_config.eos_token_id))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = path / "generation_config.json" if path else None
    if generation_config and generation_config.is_file():
        ids |= set(_as_list(json.loads(generation_config.read_text()).get("eos_token_id")))
    return ids


@dataclass
class _Job:
    job: CaptionJob
    prompt: Prompt
    image_embeds: list[torch.Tensor]
    eos_ids: set[int]
    splitter: ReasoningSplitter
    decoders: dict[str, IncrementalDecoder]
    stops: dict[str, StopMatcher]
    generator: torch.Generator
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    pending: dict[str, str] = field(default_factory=lambda: {"reasoning": "", "content": ""})

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, stream: str, text: str, final: bool) -> None:
        if self.done:
            return
        out, hit = self.stops[stream].feed(text)
        self.pending[stream] += out
        if hit:
            self.finish_reason = "stop"
        elif final:
            self.pending[stream] += self.stops[stream].flush()

    def accept(self, token_id: int) -> Delta | None:
        """Take one generated id; return this step's delta (None when nothing new is visible)."""
        self.completion_tokens += 1
        finish: FinishReason | None = None
        if token_id in self.eos_ids:
            finish = "stop"
        else:
            stream = self.splitter.route(token_id)
            if stream is not None:
                self._emit(stream, self.decoders[stream].push(token_id), final=False)
        if not self.done and finish is None and self.completion_tokens >= self.job.params.max_tokens:
            finish = "length"
        if finish is not None and not self.done:
            # Flush held-back bytes and stop-string prefixes; a stop string found here still wins.
            for stream in ("reasoning", "content"):
                self._emit(stream, self.decoders[stream].flush(), final=True)
            if not self.done:
                self.finish_reason = finish
        reasoning, content = self.pending["reasoning"], self.pending["content"]
        self.pending = {"reasoning": "", "content": ""}
        if not reasoning and not content and not self.done:
            return None
        return Delta(
            content=content,
            reasoning_content=reasoning,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt.input_ids),
            completion_tokens=self.completion_tokens,
        )


class NemotronVLEngine:
    def __init__(self, model: NemotronNanoVLV2, tokenizer, max_num_tiles: int = DEFAULT_MAX_NUM_TILES,
                 model_path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_num_tiles = max_num_tiles
        self.device = model.mlp1.linear_1.weight.device
        self.dtype = model.mlp1.linear_1.weight.dtype
        cfg = self.config
        ids = {name: _token_id(tokenizer, tok) for name, tok in (
            ("start", cfg.img_start_token), ("context", cfg.img_context_token), ("end", cfg.img_end_token))}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks an image token: {ids}")
        if cfg.img_context_token_id is not None and cfg.img_context_token_id != ids["context"]:
            raise ValueError(
                f"config img_context_token_id {cfg.img_context_token_id} != tokenizer id {ids['context']}"
            )
        self.image_tokens = ImageTokens(ids["start"], ids["context"], ids["end"], cfg.img_context_token,
                                        cfg.tokens_per_tile)
        pad = cfg.text_config.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0  # the tokenizer has no pad token; any id works under the mask
        self.eos_ids = eos_token_ids(model, tokenizer, model_path)
        self.think_start_id = _token_id(tokenizer, "<think>")
        self.think_end_id = _token_id(tokenizer, "</think>")

    # ---- preparation -------------------------------------------------------------------------------

    def _prepare(self, job: CaptionJob) -> _Job:
        cfg = self.config
        pixel_values = [
            preprocess_image(image, self.max_num_tiles, cfg.norm_mean, cfg.norm_std, cfg.use_thumbnail, cfg.image_size)
            for image in job.images
        ]
        prompt = build_prompt(self.tokenizer, job, [p.shape[0] for p in pixel_values], self.image_tokens)
        # One image per vision call: a job's features never depend on what else is in the batch.
        embeds = [self._encode(p) for p in pixel_values]
        return _Job(
            job=job,
            prompt=prompt,
            image_embeds=embeds,
            eos_ids=self.eos_ids,
            splitter=ReasoningSplitter(prompt.reasoning, self.think_start_id, self.think_end_id),
            decoders={s: IncrementalDecoder(self.tokenizer) for s in ("reasoning", "content")},
            stops={s: StopMatcher(list(job.params.stop)) for s in ("reasoning", "content")},
            generator=make_generator(job.params.seed),
        )

    @torch.inference_mode()
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_tiles(pixel_values.to(self.device))

    # ---- model calls -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, states: list[_Job]):
        length = max(len(s.prompt.input_ids) for s in states)
        input_ids = torch.full((len(states), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(states), length), dtype=torch.long)
        for row, state in enumerate(states):
            ids = state.prompt.input_ids
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        embeds = self.model.embed_tokens(input_ids)
        image_embeds = [e for s in states for e in s.image_embeds]
        if image_embeds:
            # Boolean indexing walks rows in order, then positions: the same order as the jobs' images.
            mask = (input_ids == self.image_tokens.context_id) & attention_mask.bool()
            embeds[mask] = torch.cat(image_embeds).to(embeds.dtype)
        out = self.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1], out.cache, attention_mask

    @torch.inference_mode()
    def _decode(self, tokens: torch.Tensor, cache, attention_mask: torch.Tensor):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        out = self.model.language_model(
            input_ids=tokens.to(self.device)[:, None], attention_mask=attention_mask, cache=cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1], out.cache, attention_mask

    def _choose(self, logits: torch.Tensor, states: list[_Job]) -> list[int]:
        greedy = torch.argmax(logits, dim=-1).tolist()  # one transfer for every greedy row
        chosen = []
        for row, state in enumerate(states):
            if state.done or state.job.params.greedy:
                chosen.append(int(greedy[row]))
            else:
                chosen.append(sample_token(logits[row].float().cpu(), state.job.params, state.generator))
        return chosen

    # ---- the Engine protocol -----------------------------------------------------------------------

    def generate(self, jobs: list[CaptionJob]) -> Iterator[list[Delta | None]]:
        if not jobs:
            return
        states = [self._prepare(job) for job in jobs]
        logits, cache, attention_mask = self._prefill(states)
        while True:
            tokens = self._choose(logits, states)
            deltas: list[Delta | None] = []
            for state, token in zip(states, tokens):
                deltas.append(None if state.done else state.accept(token))
            yield deltas
            for state in states:
                if not state.done and state.job.cancelled():
                    state.finish_reason = "stop"  # nobody waits for it any more (deadline or disconnect)
            if all(s.done for s in states):
                return
            # Finished rows keep decoding a pad id: cheaper than reshaping every layer's cache, and rows never mix.
            feed = torch.tensor([self.pad_id if s.done else t for s, t in zip(states, tokens)], dtype=torch.long)
            logits, cache, attention_mask = self._decode(feed, cache, attention_mask)


def load_engine(
    model_id: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES,
) -> NemotronVLEngine:
    """Download (if needed) and load the checkpoint; the returned engine is ready for `generate`."""
    model, tokenizer, path = load_model(model_id, revision, device, dtype)
    return NemotronVLEngine(model, tokenizer, max_num_tiles=max_num_tiles, model_path=path)
