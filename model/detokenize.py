"""Streaming detokenisation and the reasoning split.

`IncrementalDecoder` turns a growing list of token ids into text deltas without re-decoding the whole
output each step and without ever emitting half of a multi-byte character: it decodes a short window
(from `prefix` to the end), subtracts the window's already-emitted part, and waits while the tail is
an incomplete UTF-8 sequence (decoded as U+FFFD).

`ReasoningSplitter` routes ids like vLLM's think-tag reasoning parsers: with reasoning on, ids before
the first `</think>` are reasoning, ids after it are the answer; the think tags themselves are never
shown. It works on ids, so a tag split across text deltas can never leak.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: text of ids[prefix:read] was already emitted
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is left, even an incomplete character, at the end of a generation."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = window[len(emitted) :]
        # The next window starts at the ids just emitted, so a token that decodes differently at the very
        # start of a text (a dropped leading space) is always decoded with its left neighbour.
        self.prefix = self.read
        self.read = len(self.ids)
        return delta


class ReasoningSplitter:
    """Decide per generated id whether it belongs to reasoning, content, or nowhere (a think tag)."""

    def __init__(self, reasoning: bool, think_start_id: int | None, think_end_id: int | None):
        self.in_reasoning = reasoning and think_end_id is not None
        self.think_start_id = think_start_id
        self.think_end_id = think_end_id

    def route(self, token_id: int) -> str | None:
        """'reasoning', 'content', or None for a tag that is dropped."""
        if token_id in (self.think_start_id, self.think_end_id):
            if token_id == self.think_end_id:
                self.in_reasoning = False
            return None
        return "reasoning" if self.in_reasoning else "content"


class TokenText:
    """Generated ids -> ('reasoning' | 'content', text) pieces: the engine's text stream for a real tokenizer."""

    def __init__(self, tokenizer, reasoning: bool, think_start_id: int | None, think_end_id: int | None):
        self.splitter = ReasoningSplitter(reasoning, think_start_id, think_end_id)
        self.decoders = {s: IncrementalDecoder(tokenizer) for s in ("reasoning", "content")}

    def push(self, token_id: int) -> list[tuple[str, str]]:
        stream = self.splitter.route(token_id)
        if stream is None:
            return []
        return [(stream, self.decoders[stream].push(token_id))]

    def flush(self) -> list[tuple[str, str]]:
        return [(stream, decoder.flush()) for stream, decoder in self.decoders.items()]
