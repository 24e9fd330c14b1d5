"""Write a tiny random-weight checkpoint in the official on-disk layout: `python -m model.tiny OUT_DIR`.

Same config.json form as nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16 (model_type NemotronH_Nano_VL_V2,
llm_config, vision_config with RADIO `args`, ...), safetensors shards with the official tensor names, a
byte-level BPE tokenizer trained here (no download) with the official special tokens, and a chat
template of the official form. Tiles stay 512x512 with 256 tokens each, so prompts have real lengths.

`python -m model.tiny --fp8 OUT_DIR` writes its FP8 variant in the layout of NVIDIA's ModelOpt FP8 release
(model/quantization/export.py).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.config import translate_config
from model.official import OFFICIAL_CONFIG
from model.loader import build_model, init_random_weights
from model.weights import native_to_official

# Ids 0..12 follow the official tokenizer (`<s>`=1, `<SPECIAL_10/11/12>`=10/11/12, EOS `<SPECIAL_12>`).
SPECIAL_TOKENS = (
    ["<unk>", "<s>", "</s>"]
    + [f"<SPECIAL_{i}>" for i in range(3, 13)]
    + ["<img>", "</img>", "<image>", "<video>", "<think>", "</think>"]
)

# Same shape as the official template: BOS, System block, User/Assistant turns marked by <SPECIAL_11>,
# and an empty think block opened and closed right away under /no_think.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<SPECIAL_10>System\\n' + ns.system + '\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<SPECIAL_11>User\\n' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<SPECIAL_11>Assistant\\n' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<SPECIAL_11>Assistant\\n' -}}"
    "{%- if '/no_think' in ns.system -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Training text for the BPE merges: caption-like English, so random greedy output decodes to words.
_CORPUS = """
A photograph of a red car parked on a quiet street next to a tall building.
The chart shows revenue growing every quarter, with the largest increase in the fourth quarter.
A table lists the name, age, city and occupation of twelve people.
Two children are playing with a brown dog in a green park on a sunny afternoon.
The diagram explains how water moves from the ocean to the clouds and back to the land.
A screenshot of a web page with a search box, a menu and several links.
The image contains handwritten notes about a meeting, including dates and action items.
A bar graph compares the population of five countries in the year 2020.
An aerial view of a river winding through a forest with mountains in the background.
The slide presents three key findings: costs fell, quality improved and customers were satisfied.
A close-up of a circuit board with chips, resistors and small blue capacitors.
The map highlights the northern region in yellow and the southern region in blue.
A person wearing a white shirt is reading a book at a wooden table near a window.
The invoice shows the total amount due, the payment terms and the company address.
A line chart of temperature over time, rising in summer and falling in winter.
Caption: a scanned document page with a title, two paragraphs of text and a signature.
The figure illustrates the architecture of a neural network with an encoder and a decoder.
There are several boats in the harbor, and the sky is clear with a few white clouds.
The logo consists of a green circle with white letters in the middle.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 25 50 100 2024. Percent, dollars, units and totals.
Unicode test: café, naïve, Zürich, München, São Paulo, 東京, 北京, Ελλάδα, Москва, 😀 🚗 📊.
"""


def build_tokenizer(vocab_size: int = 640) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    return as_checkpoint_tokenizer(tokenizer)


def as_checkpoint_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the official special tokens, as the checkpoint's tokenizer presents it:
    BOS `<s>`, EOS `<SPECIAL_12>` (id 12), the official chat template."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<SPECIAL_12>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "<SPECIAL_12>")],
    )
    fast.chat_template = CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids("<SPECIAL_12>") == 12
    return fast


def unprintable_ids(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> list[int]:
    """Special tokens, padding rows, and byte tokens that are not complete printable text."""
    bad = []
    for token_id in range(vocab_size):
        if token_id < len(SPECIAL_TOKENS) or token_id >= len(tokenizer):
            bad.append(token_id)
            continue
        text = tokenizer.decode([token_id])
        if not text or "\ufffd" in text or not all(ch.isprintable() or ch == " " for ch in text):
            bad.append(token_id)
    return bad


def tiny_official_config(vocab_size: int, img_context_token_id: int, pattern: str = "M-M*M-",
                         vit_depth: int | None = 2, chunk_size: int = 16) -> dict:
    """The official config.json (model/official.py) with tiny widths: every other key as the 12B has it.

    The depth is the tiny checkpoint's unless asked for: `pattern` is the hybrid layer pattern (the 12B's
    gives its 62 layers), `vit_depth` the ViT's layers (None: the 12B's 32)."""
    official = OFFICIAL_CONFIG
    vit_args = {**official["vision_config"]["args"], "embed_dim": 32, "num_heads": 2}
    if vit_depth is not None:
        vit_args["depth"] = vit_depth
    return {
        **official,
        "projector_hidden_size": 256,
        "vit_hidden_size": 32,
        "img_context_token_id": img_context_token_id,
        "llm_config": {
            **official["llm_config"],
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": len(pattern),
            "hybrid_override_pattern": pattern,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "chunk_size": chunk_size,
        },
        # timm kwargs override the named geometry (the official file names vit_huge_patch16_224 only):
        # a 32-wide ViT.
        "vision_config": {**official["vision_config"], "args": vit_args},
    }


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    official = tiny_official_config(vocab_size, tokenizer.convert_tokens_to_ids("<image>"))
    config = translate_config(official)

    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    init_random_weights(model, seed)
    with torch.no_grad():
        # Only whole, printable tokens can win the argmax: random output decodes to readable text, and
        # EOS (a special token) ends a generation only when a test asks for it.
        model.language_model.lm_head.weight[unprintable_ids(tokenizer, vocab_size)] = 0.0
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    official_state = native_to_official(state)

    # Two shards plus an index, like the official layout.
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in official_state.items() if k.startswith("language_model.")},
        "model-00002-of-00002.safetensors": {
            k: v for k, v in official_state.items() if not k.startswith("language_model.")
        },
    }
    weight_map = {}
    for file_name, tensors in shards.items():
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        (out / file_name).chmod(0o644)  # safetensors writes 0600: others (a container user) must read it
        weight_map.update({k: file_name for k in tensors})
    total = sum(v.numel() * v.element_size() for v in official_state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(official, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 12], "pad_token_id": 0}, indent=2)
    )
    tokenizer.save_pretrained(str(out))
    return out


def write_tiny_fp8_checkpoint(out_dir: str | Path, seed: int = 0, source: str | Path | None = None) -> Path:
    """The FP8 (ModelOpt layout) checkpoint of the tiny BF16 one: `source`, or one written here with `seed`."""
    from model.quantization.export import write_fp8_checkpoint

    if source is not None:
        return write_fp8_checkpoint(source, out_dir, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        return write_fp8_checkpoint(write_tiny_checkpoint(Path(tmp) / "bf16", seed), out_dir, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true",
                        help="write the FP8 checkpoint (ModelOpt layout, calibrated scales) of the tiny BF16 one")
    parser.add_argument("--from", dest="source", default=None,
                        help="with --fp8: convert this tiny BF16 checkpoint instead of writing a fresh one")
    args = parser.parse_args()
    if args.fp8:
        path = write_tiny_fp8_checkpoint(args.out_dir, args.seed, args.source)
    else:
        path = write_tiny_checkpoint(args.out_dir, args.seed)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    kind = "tiny FP8 checkpoint" if args.fp8 else "tiny checkpoint"
    print(f"wrote {kind} to {path} ({size / 1e6:.1f} MB); use MODEL_ID={path} DEVICE=cpu")


if __name__ == "__main__":
    main()
