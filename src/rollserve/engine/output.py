"""SGLang-format outputs: {"text", "output_ids", "meta_info"} for a request's current state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from rollserve.engine.request import FinishReason, Logprob, Req
from rollserve.engine.validation import GenerateInput


@dataclass(slots=True)
class TokenTexts:
    """Per-token text for logprob triples, memoised (bounded by the vocabulary)."""

    tokenizer: PreTrainedTokenizerBase
    cache: dict[int, str] = field(default_factory=dict)

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def build_output(req: Req, token_texts: TokenTexts | None) -> dict[str, Any]:
    """`token_texts` given: logprob triples carry token text (return_text_in_logprobs)."""
    end = req.finished_time if req.finished else None
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason.to_dict() if req.finish_reason else None,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "e2e_latency": (end - req.created) if end is not None else None,
        "weight_version": req.weight_version,
    }
    if req.logprob is not None:
        meta["output_token_logprobs"] = _triples(req.output_logprobs, token_texts)
        meta["output_top_logprobs"] = [_triples(t, token_texts) for t in req.output_top_logprobs]
        meta["input_token_logprobs"] = _triples(req.input_logprobs, token_texts)
        meta["input_top_logprobs"] = [
            _triples(t, token_texts) if t is not None else None for t in req.input_top_logprobs
        ]
    return {"text": req.text, "output_ids": list(req.output_ids), "meta_info": meta}


def _triples(pairs: list[Logprob], token_texts: TokenTexts | None) -> list[list[Any]]:
    if token_texts is None:
        return [[lp, tid, None] for lp, tid in pairs]
    return [[lp, tid, token_texts(tid)] for lp, tid in pairs]


def lost_output(item: GenerateInput, last: dict[str, Any] | None, message: str
                ) -> dict[str, Any]:
    """The final output of a request whose engine went away: the last output it streamed
    (an empty one if none), finished with an abort."""
    if last is None:
        meta: dict[str, Any] = {
            "id": item.rid, "prompt_tokens": len(item.input_ids), "completion_tokens": 0,
            "cached_tokens": 0, "e2e_latency": None, "weight_version": None,
        }
        if item.logprob is not None:
            meta.update(output_token_logprobs=[], output_top_logprobs=[],
                        input_token_logprobs=[], input_top_logprobs=[])
        last = {"text": "", "output_ids": [], "meta_info": meta}
    finish = FinishReason("abort", message=message).to_dict()
    return {**last, "meta_info": {**last["meta_info"], "finish_reason": finish}}
