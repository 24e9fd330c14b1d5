"""Prompt token ids for a request, built with the checkpoint's own chat template.

Each image is one `<image>` placeholder in the templated text (placed before the user's text, one
per line, as vLLM's chat code does); after tokenisation every placeholder id becomes
`<img>` + `<image>` x (tokens_per_tile x tiles) + `</img>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.request import EngineRequest, ImagePart
from engine.runner import SpecialTokenInText

THINK, NO_THINK = "/think", "/no_think"  # the checkpoint's reasoning switches, read from the system prompt
DEFAULT_SYSTEM_PROMPT = NO_THINK  # what nv-ingest sends; the template then closes the think block


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


def system_text(system: str | None, enable_thinking: bool | None) -> str:
    """The system prompt the template sees.

    Without `enable_thinking` the request's own system text passes through (none: `/no_think`).
    With it, every `/think` and `/no_think` in that text is replaced by the one switch it asks for,
    on the first line, and the rest of the text is kept.
    """
    if enable_thinking is None:
        return DEFAULT_SYSTEM_PROMPT if system is None else system
    rest = system or ""
    while True:  # until stable: removing one switch must not leave another behind ("/no_/thinkthink")
        stripped = rest.replace(NO_THINK, "").replace(THINK, "")
        if stripped == rest:
            break
        rest = stripped
    rest = rest.strip()
    switch = THINK if enable_thinking else NO_THINK
    return f"{switch}\n{rest}" if rest else switch


def token_id(tokenizer, token: str) -> int | None:
    """The id of a token that is whole in the vocabulary, else None."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(found)


def image_tokens_for(config, tokenizer) -> ImageTokens:
    """The image tags of a checkpoint (`VLConfig`), checked against its tokenizer."""
    ids = {name: token_id(tokenizer, tok) for name, tok in (
        ("start", config.img_start_token), ("context", config.img_context_token), ("end", config.img_end_token))}
    if None in ids.values():
        raise ValueError(f"tokenizer lacks an image token: {ids}")
    if config.img_context_token_id is not None and config.img_context_token_id != ids["context"]:
        raise ValueError(f"config img_context_token_id {config.img_context_token_id} != tokenizer id {ids['context']}")
    return ImageTokens(ids["start"], ids["context"], ids["end"], config.img_context_token, config.tokens_per_tile)


def chat_messages(request: EngineRequest) -> list[dict]:
    """Our typed messages -> chat-template messages with string contents."""
    system = system_text(request.system_prompt, request.enable_thinking)
    messages: list[dict] = [{"role": "system", "content": system}]
    for message in request.messages:
        if message.role == "system":
            continue
        placeholders = "".join("<image>\n" for p in message.content if isinstance(p, ImagePart))
        messages.append({"role": message.role, "content": placeholders + message.text})
    return messages


def render(tokenizer, request: EngineRequest) -> str:
    # Templates that read `enable_thinking` themselves (as vLLM's chat_template_kwargs passes it) get it
    # too; the system prompt above already carries the switch for templates that do not.
    extra = {} if request.enable_thinking is None else {"enable_thinking": request.enable_thinking}
    return tokenizer.apply_chat_template(chat_messages(request), tokenize=False, add_generation_prompt=True,
                                         **extra)


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


def build_prompt(tokenizer, request: EngineRequest, tiles_per_image: list[int], image: ImageTokens) -> Prompt:
    text = render(tokenizer, request)
    # The template writes BOS itself; adding special tokens again would double it.
    ids = tokenizer.encode(text, add_special_tokens=False)
    # A template that closes the think block (`<think></think>` under /no_think) means no reasoning.
    reasoning = not text.rstrip().endswith("</think>")
    return Prompt(input_ids=expand_image_tokens(ids, tiles_per_image, image), text=text, reasoning=reasoning)


class PromptBuilder:
    """A request's exact prompt for one checkpoint: the worker uses it to run the request, the API
    server to refuse, before queuing, what can never fit or would forge a special token."""

    def __init__(self, tokenizer, image_tokens: ImageTokens):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        # Client text must never forge image placeholders or turn markers (the template is rendered as text).
        specials = sorted(set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens), key=len, reverse=True)
        self._special_tokens = re.compile("|".join(re.escape(t) for t in specials if t))

    def build(self, request: EngineRequest) -> Prompt:
        # Each message as sent, then the system prompt as the template sees it: taking the /think and
        # /no_think switches out of it must not join the pieces of a special token ("<ima/thinkge>").
        texts = [(f"messages[{i}]", message.text) for i, message in enumerate(request.messages)]
        texts.append(("the system prompt, once its /think and /no_think switches are applied,",
                      system_text(request.system_prompt, request.enable_thinking)))
        for where, text in texts:
            found = self._special_tokens.search(text)
            if found:
                raise SpecialTokenInText(
                    f"{where} holds the text {found.group()!r}, a special token of the model (an image "
                    "placeholder or a turn marker): clients may not write it; remove or alter it")
        return build_prompt(self.tokenizer, request, [image.num_tiles for image in request.images], self.image_tokens)


def load_prompt_builder(model_id: str, revision: str | None = None) -> PromptBuilder:
    """Tokenizer and image tags from an already downloaded checkpoint (no network): for the API server."""
    from model.loader import load_tokenizer, read_config, resolve_model_path

    path = resolve_model_path(model_id, revision, local_only=True)
    tokenizer = load_tokenizer(path)
    return PromptBuilder(tokenizer, image_tokens_for(read_config(path), tokenizer))
