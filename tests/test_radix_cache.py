"""RadixCache unit behaviour over a real KVPool."""

from __future__ import annotations

import torch

from rollserve.engine.kv_pool import KVPool
from rollserve.engine.radix_cache import RadixCache
from rollserve.models.config import ModelConfig, RopeConfig


def _pool(size: int = 64) -> KVPool:
    config = ModelConfig("LlamaForCausalLM", 100, 8, 16, 1, 2, 1, 4, 1e-6, 128,
                         RopeConfig(10000.0, "default"), False, False, False, "float32", (), None)
    return KVPool(config, size, torch.float32, torch.device("cpu"))


def _insert(cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    slots = cache.pool.alloc(len(tokens))
    already = cache.insert(tokens, slots)
    cache.pool.free(slots[:already])
    return slots


def test_match_prefix_returns_longest_cached_prefix_and_splits_nodes() -> None:
    cache = RadixCache(_pool())
    slots = _insert(cache, [1, 2, 3, 4, 5])
    matched, node = cache.match_prefix([1, 2, 3, 9])
    assert matched.tolist() == slots[:3].tolist()
    assert node.key == [1, 2, 3]  # split at the divergence
    assert cache.match_prefix([7])[0].numel() == 0


def test_insert_reports_already_cached_tokens() -> None:
    cache = RadixCache(_pool())
    _insert(cache, [1, 2, 3])
    slots = cache.pool.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], slots) == 3
    cache.pool.free(slots[:3])
    assert cache.total_size == 5 and cache.evictable_size == 5


def test_locked_nodes_are_never_evicted_and_lru_goes_first() -> None:
    pool = _pool(16)
    cache = RadixCache(pool)
    _insert(cache, [1, 2, 3, 4])
    _insert(cache, [5, 6, 7, 8])
    _insert(cache, [9, 10, 11, 12])
    _, locked = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(locked)
    cache.match_prefix([9, 10, 11, 12])  # touch: now [5..8] is least recently used
    assert cache.evict(4) == 4
    assert cache.match_prefix([5, 6, 7, 8])[0].numel() == 0
    assert cache.match_prefix([9, 10, 11, 12])[0].numel() == 4
    assert cache.evict(100) == 4  # only the unlocked entry goes
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 4
    assert cache.protected_size == 4 and cache.evictable_size == 0
    cache.dec_lock_ref(locked)
    assert cache.reset() == 4
    assert pool.num_free == 16


def test_reset_detaches_entries_in_use_and_frees_them_on_unlock() -> None:
    pool = _pool(16)
    cache = RadixCache(pool)
    _insert(cache, [1, 2, 3, 4])
    _insert(cache, [5, 6])
    _, in_use = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(in_use)
    epoch = cache.epoch
    assert cache.reset() == 2  # the unused entry goes now
    assert cache.epoch == epoch + 1
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 0  # never matched again
    assert cache.total_size == 0 and cache.detached_size == 4
    _insert(cache, [1, 2, 3, 4])  # the same key, fresh KV, lives beside the detached one
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 4
    cache.dec_lock_ref(in_use)
    assert cache.detached_size == 0 and pool.num_free == 12
    assert cache.reset() == 4 and pool.num_free == 16


def test_disabled_cache_matches_nothing() -> None:
    cache = RadixCache(_pool(), disabled=True)
    slots = cache.pool.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
