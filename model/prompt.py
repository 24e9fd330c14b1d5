"""Prompt token ids for a job, built with the checkpoint's own chat template.

Each image is one `<image>` placeholder in the templated text (placed before the user's text, one
per line, as vLLM's chat code does); after tokenisation every placeholder id becomes
`<img>` + `<image>` x (tokens_per_tile x tiles) + `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.types import CaptionJob, ImagePart, TextPart

DEFAULT_SYSTEM_PROMPT = "/no_think"  # what nv-ingest sends; the template then closes the think block


@dataclass(frozen=True)
class ImageTokens:
    start_id: int
    context_id: int
    end_id: int
    context_token: str
    tokens_per_tile: int


@dataclass
class Prompt:
    input_ids: list[int]
    text: str  # templated text, placeholders not yet expanded
    reasoning: bool  # the prompt leaves a think block open for the model


def chat_messages(job: CaptionJob) -> list[dict]:
    """Our typed messages -> chat-template messages with string contents."""
    messages: list[dict] = []
    system = job.system_prompt if any(m.role == "system" for m in job.messages) else DEFAULT_SYSTEM_PROMPT
    messages.append({"role": "system", "content": system})
    for message in job.messages:
        if message.role == "system":
            continue
        placeholders = "".join("<image>\n" for p in message.content if isinstance(p, ImagePart))
        text = "".join(p.text for p in message.content if isinstance(p, TextPart))
        messages.append({"role": message.role, "content": placeholders + text})
    return messages


def render(tokenizer, job: CaptionJob) -> str:
    return tokenizer.apply_chat_template(chat_messages(job), tokenize=False, add_generation_prompt=True)


def expand_image_tokens(ids: list[int], tiles_per_image: list[int], image: ImageTokens) -> list[int]:
    placeholders = sum(1 for i in ids if i == image.context_id)
    if placeholders != len(tiles_per_image):
        raise ValueError(f"prompt has {placeholders} image placeholders for {len(tiles_per_image)} images")
    out: list[int] = []
    images = iter(tiles_per_image)
    for token in ids:
        if token == image.context_id:
            out.append(image.start_id)
            out.extend([image.context_id] * (image.tokens_per_tile * next(images)))
            out.append(image.end_id)
        else:
            out.append(token)
    return out


def build_prompt(tokenizer, job: CaptionJob, tiles_per_image: list[int], image: ImageTokens) -> Prompt:
    text = render(tokenizer, job)
    # The template writes BOS itself; adding special tokens again would double it.
    ids = tokenizer.encode(text, add_special_tokens=False)
    # A template that closes the think block (`<think></think>` under /no_think) means no reasoning.
    reasoning = not text.rstrip().endswith("</think>")
    return Prompt(input_ids=expand_image_tokens(ids, tiles_per_image, image), text=text, reasoning=reasoning)
