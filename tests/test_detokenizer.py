"""Incremental detokenisation never emits half a UTF-8 character."""

from __future__ import annotations

from transformers import AutoTokenizer

from rollserve.engine.detokenizer import IncrementalDetokenizer, find_stop


def test_streamed_pieces_never_split_a_character_and_add_up(llama_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    text = "naïve café 日本語 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer.for_prompt(tokenizer, [], skip_special_tokens=True)
    pieces = [detok.append([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == detok.text


def test_find_stop_sees_a_stop_straddling_old_and_new_text() -> None:
    assert find_stop("hello wor", 3, ["lo w"]) == (3, "lo w")
    assert find_stop("abc", 1, ["zz"]) is None
    assert find_stop("xxSTOPyySTOP", 6, ["STOP", "yy"]) == (6, "yy")
