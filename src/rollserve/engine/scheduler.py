"""Continuous batching: every step admits waiting requests into the running batch, runs one
mixed forward (decode tokens + prefill chunks), samples, and retires finished requests.

Invariants:
- A running request owns a table row; slots [0, tree_len) of that row belong to the radix
  cache (locked at tree_node), slots [tree_len, kv_len) belong to the request.
- A request is admitted only when the pool (free + evictable) can hold its next chunk; when
  decoding runs out of slots, requests are retracted (cached, requeued, recomputed later).
- Weight changes: while `hold_admission` is set only requests that already started are
  scheduled, so the engine drains to a point where new weights can go in without any request
  seeing two versions; while `paused` nothing runs at all. A request whose KV predates a cache
  reset (`cache_epoch`) never hands that KV to the cache.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from rollserve.engine.detokenizer import find_stop
from rollserve.engine.kv_pool import KVPool, ReqToTokenTable
from rollserve.engine.latency import ITL_BUCKETS, TTFT_BUCKETS, Histogram
from rollserve.engine.model_runner import ExtendChunk, ModelRunner, ScheduledBatch, StepLogits
from rollserve.engine.radix_cache import RadixCache
from rollserve.engine.request import FinishReason, Req
from rollserve.engine.sampler import sample, token_logprobs
from rollserve.kernels.sampling import NativeSampling

logger = logging.getLogger(__name__)

LPM_MAX_QUEUE = 128  # longest-prefix-match ordering costs a tree walk per waiting request
NEW_TOKEN_RATIO = 0.3  # share of each running request's remaining budget kept free for it
# A budget counts at most this much towards that share (SGLang clips the same way): a request
# without max_new_tokens has the whole context left as its budget.
BUDGET_ESTIMATE_CLIP = 4096
PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass(slots=True)
class SchedulerConfig:
    max_running_requests: int
    chunked_prefill_size: int  # <= 0: whole prompts in one step
    schedule_policy: str  # "fcfs" or "lpm"
    context_len: int


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    prefill_steps: int = 0  # steps that computed prompt tokens (possibly with decodes too)
    prefill_step_seconds: float = 0.0  # forward + sampling time of those steps
    decode_step_seconds: float = 0.0  # the same for decode-only steps
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    retracted: int = 0
    max_running: int = 0
    requests_finished: int = 0
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, runner: ModelRunner, pool: KVPool,
        table: ReqToTokenTable, cache: RadixCache, eos_ids: tuple[int, ...],
        generator: torch.Generator, native_sampling: NativeSampling | None = None,
    ) -> None:
        self.config, self.runner, self.pool = config, runner, pool
        self.table, self.cache, self.eos_ids = table, cache, eos_ids
        self.generator, self.native_sampling = generator, native_sampling
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.stats = SchedulerStats()
        self.weight_version = "default"
        self.paused = False
        self.hold_admission = False

    @property
    def has_work(self) -> bool:
        if self.paused:
            return False
        if self.hold_admission:
            return bool(self.running) or any(r.started for r in self.waiting)
        return bool(self.waiting or self.running)

    @property
    def drained(self) -> bool:
        """Nothing is mid-generation: new weights can go in now."""
        return self.paused or not (self.running or any(r.started for r in self.waiting))

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, FinishReason("abort", message=message))
                return True
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self._release(req)
                self._finish(req, FinishReason("abort", message=message))
                return True
        return False

    def abort_all(self, message: str) -> None:
        for req in [*self.waiting, *self.running]:
            self.abort(req.rid, message)

    def flush_cache(self) -> int:
        """Drop the whole cache; always succeeds (entries in use are detached, see
        RadixCache.reset), so no prefix computed before can be matched afterwards."""
        return self.cache.reset()

    def pause(self, mode: str) -> None:
        """Stop running steps. abort: finish every request with an abort reason; retract:
        give back running requests' KV and requeue them (recomputed when resumed); in_place:
        keep them as they are, KV included."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        if mode == "abort":
            self.abort_all("generation paused (pause_generation mode=abort)")
        elif mode == "retract":
            for req in list(self.running):
                self._retract(req)
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def weights_changed(self, version: str | None) -> None:
        """New weights are in. Requests already under way (only possible while paused)
        continue on them and report the new version: the one that produced their last token."""
        if version is not None:
            self.weight_version = version
        for req in [*self.running, *self.waiting]:
            if req.started:
                req.weight_version = self.weight_version

    def step(self) -> None:
        if self.paused:
            return
        batch = self._schedule()
        if batch.num_tokens == 0:
            return
        started = time.perf_counter()
        slots = self._take_slots(batch.num_tokens)
        logits = self.runner.run(batch, slots)
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, len(self.running))
        self._process(batch, logits)
        self._record_step_time(bool(batch.extends), time.perf_counter() - started)

    def _record_step_time(self, prefill: bool, seconds: float) -> None:
        if prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_step_seconds += seconds
        else:
            self.stats.decode_step_seconds += seconds

    # ---- scheduling -------------------------------------------------------------------

    def _schedule(self) -> ScheduledBatch:
        decodes = self._secure_decode_slots([r for r in self.running if r.prefill_done])
        budget = self.config.chunked_prefill_size
        budget = budget if budget > 0 else 1 << 62
        claimed = len(decodes)
        extends: list[ExtendChunk] = []
        for req in self.running:
            room = min(budget, self._available() - claimed)
            if not req.prefill_done and room > 0:
                extends.append(self._chunk(req, room))
                budget -= extends[-1].size
                claimed += extends[-1].size
        while budget > 0 and self.waiting and len(self.running) < self.config.max_running_requests:
            picked = self._next_admissible()
            if picked is None:
                break
            req, prefix_slots = picked
            if not self._can_hold(claimed + req.seq_len - req.kv_len, req):
                self._unlock_prefix(req)
                break
            self.waiting.remove(req)
            self._admit(req, prefix_slots)
            extends.append(self._chunk(req, budget))
            budget -= extends[-1].size
            claimed += extends[-1].size
        return ScheduledBatch(decodes, extends)

    def _next_admissible(self) -> tuple[Req, torch.Tensor] | None:
        """The next waiting request by policy, with its cached prefix matched and locked."""
        candidates = (r for r in self.waiting
                      if not self._waits_for_leader(r) and (r.started or not self.hold_admission))
        if self.config.schedule_policy == "lpm" and len(self.waiting) <= LPM_MAX_QUEUE:
            matched = [(len(self.cache.match_prefix(self._match_key(r))[0]), r)
                       for r in candidates]
            req = max(matched, key=lambda m: m[0])[1] if matched else None
        else:
            req = next(candidates, None)  # fcfs: no scan of a long queue
        return None if req is None else (req, self._lock_prefix(req))

    def _waits_for_leader(self, req: Req) -> bool:
        leader = req.leader
        return (
            leader is not None and not self.cache.disabled
            and not leader.prefill_done and not leader.finished
        )

    def _match_key(self, req: Req) -> list[int]:
        return req.fill_range(0, req.cache_match_limit())

    def _lock_prefix(self, req: Req) -> torch.Tensor:
        slots, node = self.cache.match_prefix(self._match_key(req))
        self.cache.inc_lock_ref(node)
        req.tree_node, req.tree_len, req.kv_len = node, len(slots), len(slots)
        req.cache_epoch = self.cache.epoch
        return slots

    def _unlock_prefix(self, req: Req) -> None:
        self.cache.dec_lock_ref(req.tree_node)
        req.tree_node, req.tree_len, req.kv_len = None, 0, 0

    def _available(self) -> int:
        return self.pool.num_free + self.cache.evictable_size

    def _can_hold(self, tokens: int, candidate: Req) -> bool:
        """Room for `tokens` now plus a share of every running request's remaining budget
        (an idle engine admits anything that fits now: retraction handles the rest)."""
        if not self.running:
            return tokens <= self._available()
        reserve = sum(self._remaining_budget(r) for r in [*self.running, candidate])
        return tokens + int(reserve * NEW_TOKEN_RATIO) <= self._available()

    @staticmethod
    def _remaining_budget(req: Req) -> int:
        return min(max(req.sampling.max_new_tokens - len(req.output_ids), 0),
                   BUDGET_ESTIMATE_CLIP)

    def _admit(self, req: Req, prefix_slots: torch.Tensor) -> None:
        req.table_row = self.table.alloc_row()
        self.table.slots[req.table_row, : req.tree_len] = prefix_slots
        if not req.started:
            req.started, req.weight_version = True, self.weight_version
        if not req.output_ids:  # a readmitted (retracted) request reports its first hit
            req.cached_tokens = req.tree_len
            self.stats.prompt_tokens += len(req.input_ids)
            self.stats.cached_tokens += req.tree_len
        self.running.append(req)

    def _chunk(self, req: Req, budget: int) -> ExtendChunk:
        return ExtendChunk(req, req.kv_len, min(req.seq_len, req.kv_len + budget))

    def _secure_decode_slots(self, decodes: list[Req]) -> list[Req]:
        """Make room for one new slot per decoding request, retracting requests if needed."""
        shortfall = len(decodes) - self.pool.num_free
        if shortfall > 0:
            self.cache.evict(shortfall)
        while len(decodes) > self.pool.num_free and decodes:
            victim = min(decodes, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            decodes.remove(victim)
            self._retract(victim)
            if not self.running:
                logger.warning("KV pool cannot hold request %s alone", victim.rid)
            self.cache.evict(len(decodes) - self.pool.num_free)
        return decodes

    def _retract(self, req: Req) -> None:
        """Give back a running request's KV (kept in the cache while space allows) and requeue
        it; it is recomputed from prompt + outputs so far when readmitted."""
        self.running.remove(req)
        self._release(req)
        req.prefill_done = False
        self.waiting.appendleft(req)
        self.stats.retracted += 1

    def _take_slots(self, count: int) -> torch.Tensor:
        if self.pool.num_free < count:
            self.cache.evict(count - self.pool.num_free)
        slots = self.pool.alloc(count)
        if slots is None:
            raise RuntimeError("KV pool accounting error: admitted work does not fit")
        return slots

    # ---- after the forward ------------------------------------------------------------

    def _process(self, batch: ScheduledBatch, step: StepLogits) -> None:
        self._record_input_logprobs(step)
        for req in batch.decodes:
            req.kv_len += 1
        for chunk in batch.extends:
            chunk.req.kv_len = chunk.end
            # Cache every computed chunk, the last one too: n > 1 siblings and concurrent
            # requests with the same prompt reuse it while this request decodes.
            self._cache_prefix(chunk.req)
            if chunk.completes_prompt:
                chunk.req.prefill_done = True
                chunk.req.input_logprobs_done = True
        if not step.sample_reqs:
            return
        sample_logits = step.logits[: len(step.sample_reqs)]
        next_ids = sample(sample_logits, step.sample_reqs, self.eos_ids, self.generator,
                          self.native_sampling)
        self._record_output_logprobs(sample_logits, next_ids, step.sample_reqs)
        for req, token in zip(step.sample_reqs, next_ids.tolist(), strict=True):
            self._append_token(req, token)
        for req in step.sample_reqs:
            if req.finished:
                self.running.remove(req)
                self._release(req)
            req.on_output(req)

    def _record_input_logprobs(self, step: StepLogits) -> None:
        for chunk, positions, first_row in step.input_logprob_rows:
            req = chunk.req
            rows = step.logits[first_row : first_row + len(positions)]
            targets = torch.tensor([req.input_ids[p + 1] for p in positions])
            pairs, tops = token_logprobs(rows, targets, req.logprob.top_num)
            req.input_logprobs.extend(pairs)
            req.input_top_logprobs.extend(tops)

    def _record_output_logprobs(
        self, logits: torch.Tensor, next_ids: torch.Tensor, reqs: list[Req]
    ) -> None:
        rows = [i for i, r in enumerate(reqs) if r.logprob is not None]
        if not rows:
            return
        top_num = max(reqs[i].logprob.top_num for i in rows)
        index = torch.tensor(rows)
        pairs, tops = token_logprobs(logits[index.to(logits.device)], next_ids[index], top_num)
        for i, pair, top in zip(rows, pairs, tops, strict=True):
            req = reqs[i]
            if req.sampling.max_new_tokens == 0:
                continue
            req.output_logprobs.append(pair)
            req.output_top_logprobs.append(top[: req.logprob.top_num])

    def _append_token(self, req: Req, token: int) -> None:
        params = req.sampling
        if params.max_new_tokens == 0:
            self._finish(req, FinishReason("length", length=0))
            return
        req.output_ids.append(token)
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats.time_to_first_token.observe(now - req.created)
        else:
            self.stats.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        self.stats.generated_tokens += 1
        new_text = req.detokenizer.append([token])
        if len(req.output_ids) >= params.max_new_tokens:
            self._finish(req, FinishReason("length", length=params.max_new_tokens))
        elif (not params.ignore_eos and token in self.eos_ids) or token in params.stop_token_ids:
            self._finish(req, FinishReason("stop", matched=token))
        elif params.stop and (found := find_stop(req.detokenizer.text, len(new_text), params.stop)):
            start, stop = found
            req.stop_text_len = start + (len(stop) if params.no_stop_trim else 0)
            self._finish(req, FinishReason("stop", matched=stop))
        elif req.seq_len >= self.config.context_len:
            self._finish(req, FinishReason("length", length=len(req.output_ids)))

    def _finish(self, req: Req, reason: FinishReason) -> None:
        if req.stop_text_len is None:
            req.detokenizer.flush()
        req.finish_reason = reason
        req.finished_time = time.monotonic()
        self.stats.requests_finished += 1
        if reason.type == "abort":
            req.on_output(req)

    def _cache_prefix(self, req: Req) -> None:
        """Hand the computed prefix to the cache and re-lock it at its new end."""
        if self.cache.disabled or self._kv_is_stale(req):
            return
        self._insert_into_cache(req)
        slots, node = self.cache.match_prefix(req.fill_range(0, req.kv_len))
        self.cache.inc_lock_ref(node)
        self.cache.dec_lock_ref(req.tree_node)
        self.table.slots[req.table_row, : len(slots)] = slots
        req.tree_node, req.tree_len = node, len(slots)

    def _insert_into_cache(self, req: Req) -> None:
        row = self.table.slots[req.table_row]
        already = self.cache.insert(req.fill_range(0, req.kv_len), row[: req.kv_len])
        # Our slots for tokens the tree already held are duplicates: give them back.
        if already > req.tree_len:
            self.pool.free(row[req.tree_len : already].clone())

    def _release(self, req: Req) -> None:
        """Return a leaving request's KV: into the cache, or to the pool when disabled."""
        row = self.table.slots[req.table_row]
        if self.cache.disabled:
            self.pool.free(row[: req.kv_len].clone())
        elif self._kv_is_stale(req):  # its KV may not enter the cache: free our own part
            self.pool.free(row[req.tree_len : req.kv_len].clone())
            self.cache.dec_lock_ref(req.tree_node)
        else:
            self._insert_into_cache(req)
            self.cache.dec_lock_ref(req.tree_node)
        self.table.free_row(req.table_row)
        req.table_row, req.tree_node, req.tree_len, req.kv_len = None, None, 0, 0

    def _kv_is_stale(self, req: Req) -> bool:
        return req.cache_epoch != self.cache.epoch
