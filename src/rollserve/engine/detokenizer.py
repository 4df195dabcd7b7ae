"""Incremental detokenisation and stop-string matching for one request's output."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded together with the first output tokens, so that tokenizers whose
# pieces depend on the left context (leading-space handling) render the first word right.
CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Appends tokens and returns only complete new text: a token that ends inside a
    multi-byte UTF-8 character is held back until the character is complete."""

    tokenizer: PreTrainedTokenizerBase
    skip_special_tokens: bool
    ids: list[int] = field(default_factory=list)
    text: str = ""
    surrounding_offset: int = 0  # decoding starts here, for context
    read_offset: int = 0  # tokens before this were already turned into `text`

    @classmethod
    def for_prompt(
        cls, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], skip_special_tokens: bool
    ) -> IncrementalDetokenizer:
        context = prompt_ids[-CONTEXT_TOKENS:]
        return cls(tokenizer, skip_special_tokens, list(context), "", 0, len(context))

    def append(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is held back, even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        before = decode(self.ids[self.surrounding_offset : self.read_offset],
                        skip_special_tokens=skip)
        after = decode(self.ids[self.surrounding_offset :], skip_special_tokens=skip)
        if after.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        new_text = after[len(before) :]
        self.text += new_text
        self.surrounding_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last `new_len` characters of `text`
    (so one that straddles earlier text and new text is found too), as (start, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best
