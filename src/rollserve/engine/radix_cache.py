"""Radix tree from token-id prefixes to KV pool slots (SGLang's RadixAttention semantics).

Invariants:
- Every slot referenced by the tree is allocated in the pool and owned by the tree.
- A node with lock_ref > 0 is in use by a running request, and so are all its ancestors
  (locks are taken and released along the whole path); locked nodes are never evicted.
- evictable_size + protected_size == number of slots the live tree owns; detached_size counts
  the slots of detached nodes (see `reset`), which are freed when their last user unlocks them.
- `epoch` changes whenever every cached entry became invalid (`reset`): KV computed before
  must never be inserted afterwards.
"""

from __future__ import annotations

import heapq
import time

import torch

from rollserve.engine.kv_pool import KVPool

_EMPTY = torch.empty(0, dtype=torch.int64)


class RadixNode:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: list[int], value: torch.Tensor, parent: RadixNode | None) -> None:
        self.key = key
        self.value = value  # one pool slot per token of `key`
        self.parent = parent
        self.children: dict[int, RadixNode] = {}
        self.lock_ref = 0
        self.last_access = time.monotonic()

    def __lt__(self, other: RadixNode) -> bool:
        return self.last_access < other.last_access


class RadixCache:
    def __init__(self, pool: KVPool, disabled: bool = False) -> None:
        self.pool = pool
        self.disabled = disabled
        self.root = RadixNode([], _EMPTY.to(pool.device), None)
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0
        self.protected_size = 0
        self.detached_size = 0
        self.epoch = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, RadixNode]:
        """Slots of the longest cached prefix of `key`, and the node where it ends.
        Splits a node when the match ends inside it, so the returned node covers it exactly."""
        node, values = self.root, []
        if self.disabled:
            return self.root.value, self.root
        now = time.monotonic()
        while key and key[0] in node.children:
            child = node.children[key[0]]
            child.last_access = now
            matched = _common_prefix_len(child.key, key)
            if matched < len(child.key):
                child = self._split(child, matched)
            values.append(child.value)
            node, key = child, key[matched:]
        value = torch.cat(values) if values else self.root.value
        return value, node

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Add `key` -> `value`; returns how many leading tokens were already cached. The
        caller still owns (and must free) its slots for those leading tokens."""
        if self.disabled:
            return 0
        node, done, now = self.root, 0, time.monotonic()
        while done < len(key) and key[done] in node.children:
            child = node.children[key[done]]
            child.last_access = now
            matched = _common_prefix_len(child.key, key[done:])
            if matched < len(child.key):
                child = self._split(child, matched)
            node, done = child, done + matched
        if done < len(key):
            leaf = RadixNode(key[done:], value[done:].clone(), node)
            node.children[key[done]] = leaf
            self.evictable_size += len(leaf.key)
        return done

    def inc_lock_ref(self, node: RadixNode) -> None:
        """Lock a node of the live tree (as returned by match_prefix) and its ancestors."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: RadixNode) -> None:
        """Unlock a path; detached nodes nobody uses any more are freed on the way."""
        live = self._is_live(node)
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0 and live:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            elif node.lock_ref == 0:
                # Its descendants reached zero first (locks cover whole paths) and are gone.
                self.pool.free(node.value)
                self.detached_size -= len(node.key)
                del node.parent.children[node.key[0]]
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from least recently used unlocked leaves (fewer
        if not enough are evictable). Returns the number freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def reset(self) -> int:
        """Forget every entry, because cached KV is no longer valid (new weights). Unused
        entries are freed now; entries in use by running requests are detached: never matched
        again, and freed when their last user unlocks them. Returns the tokens freed now."""
        freed = self.evict(self.evictable_size)
        if self.root.children:  # all locked now: unlocked subtrees were just evicted
            detached = RadixNode([], self.root.value, None)
            detached.children = self.root.children
            for child in detached.children.values():
                child.parent = detached
            self.root.children = {}
            self.detached_size += self.protected_size
            self.protected_size = 0
        self.epoch += 1
        return freed

    def _is_live(self, node: RadixNode) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is self.root

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child`'s edge after `at` tokens; returns the new upper node."""
        upper = RadixNode(child.key[:at], child.value[:at], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[at]] = child
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[at:], child.value[at:], upper
        return upper

    def _nodes(self) -> list[RadixNode]:
        stack, out = [self.root], []
        while stack:
            node = stack.pop()
            out.extend(node.children.values())
            stack.extend(node.children.values())
        return out


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):  # noqa: B905 (lengths differ by design)
        if x != y:
            return i
    return min(len(a), len(b))


