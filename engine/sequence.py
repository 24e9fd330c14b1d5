"""One request's life inside the engine: its slot, its prompt progress, its tokens and its text."""

from __future__ import annotations

import enum

from engine.request import EngineRequest, FinishReason, RequestOutput, SamplingParams
from engine.runner import Prompt
from model.stops import StopMatcher

STREAMS = ("reasoning", "content")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: EngineRequest, params: SamplingParams, prompt: Prompt, arrival: int):
        self.request = request
        self.params = params
        self.prompt = prompt
        self.arrival = arrival
        self.status = Status.WAITING
        self.slot: int | None = None
        self.num_prefilled = 0
        self.last_token: int | None = None
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.generator = None  # the sampler's per-sequence RNG, made on first use when a seed is given
        self.prefill_started: float | None = None  # time.monotonic() when its first prefill step began
        self.prefill_s: float | None = None  # its first token's time since then, until an output carries it
        self._stops = {s: StopMatcher(list(params.stop)) for s in STREAMS}
        self._pending = {s: "" for s in STREAMS}

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prefilled(self) -> bool:
        return self.num_prefilled >= self.prompt.length

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def eos_allowed(self) -> bool:
        return not self.params.ignore_eos and self.completion_tokens >= self.params.min_tokens

    def _emit(self, pieces: list[tuple[str, str]], final: bool) -> None:
        for stream, text in pieces:
            if self.done:
                return
            out, hit = self._stops[stream].feed(text)
            self._pending[stream] += out
            if hit:
                self.finish_reason = "stop"
        if final and not self.done:
            for stream in STREAMS:
                self._pending[stream] += self._stops[stream].flush()

    def accept(self, token_id: int) -> RequestOutput | None:
        """Take one generated id; return this step's output (None when nothing new is visible)."""
        self.last_token = token_id
        self.completion_tokens += 1
        finish: FinishReason | None = None
        if token_id in self.prompt.eos_ids and not self.params.ignore_eos:
            finish = "stop"
        else:
            self._emit(self.prompt.text.push(token_id), final=False)
        if not self.done and finish is None and self.completion_tokens >= self.params.max_tokens:
            finish = "length"
        if finish is not None and not self.done:
            # Flush held-back bytes and stop-string prefixes; a stop string found here still wins.
            self._emit(self.prompt.text.flush(), final=True)
            if not self.done:
                self.finish_reason = finish
        reasoning, content = self._pending["reasoning"], self._pending["content"]
        self._pending = {s: "" for s in STREAMS}
        if not reasoning and not content and not self.done:
            return None
        return RequestOutput(self.request_id, content=content, reasoning_content=reasoning,
                             finish_reason=self.finish_reason, prompt_tokens=self.prompt.length,
                             completion_tokens=self.completion_tokens)
