"""bench/dummy.py: the random-weight checkpoint's tokenizer covers the whole head with text."""

from __future__ import annotations


def test_dummy_tokenizer_covers_the_whole_head():
    from bench.dummy import build_full_tokenizer

    tokenizer = build_full_tokenizer()
    assert len(tokenizer) == 131072
    assert tokenizer.convert_tokens_to_ids(["<s>", "<SPECIAL_12>", "<image>"]) == [1, 12, 15]
    words = [tokenizer.decode([i]) for i in range(275, 131072, 997)]  # past the specials and the byte symbols
    assert all(w.strip() and w.strip().isalpha() for w in words), words[:5]
    text = tokenizer.decode(list(range(275, 131072, 1013)))
    assert text.count(" ") > 10  # words, not one run of letters
