"""The random-weight checkpoint of the GPU benchmark: config, tokenizer and chat template, no weights.

`LOAD_FORMAT=dummy` builds the full-size architecture with random weights, whose head produces any of
the 131,072 ids of the vocabulary. For every generated id to decode to text (so that each token goes
through detokenising, stop matching and the output path, as with the real model), the tokenizer here
covers the whole head: the official special tokens at ids 0..18, the 256 byte-level symbols, then
lowercase "words" of 2 to 4 letters, with and without a leading space, each one BPE merge of a shorter
token and one letter, until the vocabulary has exactly the head's size (about one token in seven starts
a word). Special ids (19, EOS among them) and the byte symbols that are no whole printable character
(161) are 0.14% of the ids: nearly every generated token is text. (This replaces restricting the head
to a small tokenizer's ids, as the tiny checkpoint does: no hook in the model or the server is needed,
the CUDA graphs are untouched, and sampling at temperature 1.0 draws from the whole head as it would.)
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model.official import OFFICIAL_CONFIG
from model.tiny import SPECIAL_TOKENS, as_checkpoint_tokenizer

SPACE = "\u0120"  # byte-level BPE's symbol for " "


def _merges(vocab_size: int, base: int) -> list[tuple[str, str, str]]:
    """(token, left, right) in rank order, `token` = `left` + `right`, every `left` ranked before: words of 2
    and 3 letters, with a leading space too (about one token in seven starts a word), then 4 letters."""
    letters = string.ascii_lowercase
    out = []
    for prefix, length in (("", 2), (SPACE, 1), ("", 3), (SPACE, 2), (SPACE, 3), ("", 4), (SPACE, 4)):
        for tail in itertools.product(letters, repeat=length):
            if len(out) + base >= vocab_size:
                return out
            token = prefix + "".join(tail)
            out.append((token, token[:-1], token[-1]))
    return out


def build_full_tokenizer(vocab_size: int = OFFICIAL_CONFIG["llm_config"]["vocab_size"]) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    merges = []
    for token, left, right in _merges(vocab_size, len(vocab)):
        vocab[token] = len(vocab)
        merges.append((left, right))
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = as_checkpoint_tokenizer(tokenizer)
    assert len(fast) == vocab_size
    return fast


def write_dummy_checkpoint(out: Path) -> Path:
    """Config, tokenizer and chat template of a full-size checkpoint, without weights (LOAD_FORMAT=dummy)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_full_tokenizer()
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config["img_context_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 12]}))
    tokenizer.save_pretrained(str(out))
    return out
