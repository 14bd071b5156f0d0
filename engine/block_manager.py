"""Paged KV block manager with automatic prefix caching. Pure Python: no torch.

Ownership: a block is owned by the requests whose tables list it (``ref_count`` of them).
A block whose tokens are all computed and which is full gets a chained hash
(parent block's hash + its token ids) and becomes findable by later requests. A cached
block whose last reference goes away is not wiped: it joins an LRU pool and is evicted
only when a fresh block is needed and no never-cached block is left.

Running out of blocks is a return value (``None``), never an exception.
Every change to the set of cached blocks is recorded as a KV event with an increasing id,
for the router's KV index.

The host tier (``num_host_blocks`` > 0; the tensors are ``engine.kv_host_tier``'s): a cached block
evicted from the device is first copied to a host slot (an *offload*), where it stays findable
under its hash, in an LRU of its own; a prefix match that ends on the device goes on in the host
tier, and the blocks it finds there get device blocks on allocation and are copied back into them
(a *load*) before any step reads them: they count as cached tokens. The tier is inclusive: a
loaded block keeps its host copy, so evicting it again costs no copy. This class only decides:
every copy it decides is queued as a :class:`HostCopy`, and the engine runs them
(``take_host_copies``), in the order given, before the next step or KV transfer touches the cache.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.hashing import NONE_HASH, hash_block
from protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Medium


@dataclass(frozen=True)
class HostBlock:
    """A prefix match's block found in the host tier (an entry of :meth:`BlockManager.match_prefix`'s
    list beside device block ids): :meth:`BlockManager.allocate` gives it a device block and queues
    its load."""

    block_hash: int


@dataclass(frozen=True)
class HostCopy:
    """One block copied between the device cache and the host tier: ``offload`` copies device block
    ``block_id`` into host slot ``slot``, else (a load) the slot into the block. The copies of a
    batch run in their order (a slot may be loaded from, then reused for an offload)."""

    offload: bool
    block_id: int
    slot: int


@dataclass
class _HostEntry:
    slot: int
    parent_hash: int
    token_ids: tuple[int, ...]


@dataclass
class HostTierStats:
    num_offloaded: int = 0  # device blocks copied to the host tier on eviction
    num_loaded: int = 0  # host blocks copied back into device blocks (prefix hits)
    num_evicted: int = 0  # host blocks the host tier's own LRU dropped for room
    num_dropped: int = 0  # evicted device blocks that found no host slot (all held for loads)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        if num_host_blocks < 0:
            raise ValueError("num_host_blocks must be >= 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        # Never cached (or cache cleared), ref 0. Blocks used before and holding nothing findable
        # go to the front: they are reused before never-used blocks, whose pages a CPU cache has
        # not mapped yet (a prefill into them takes a page fault per 4 KiB of K/V it writes).
        self._free: deque[int] = deque(range(num_blocks))
        # Blocks [0, frontier) have been handed out at least once: never-used blocks leave the
        # free list in id order, so the next fresh ones are frontier, frontier + 1, ...
        self.frontier = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, oldest first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._parents: dict[int, int] = {}  # block hash -> parent hash, for snapshots
        self._tables: dict[str, list[int]] = {}
        self._chain: dict[str, list[int]] = {}  # request -> hashes of its committed full blocks
        self._events: list[KVEvent] = []
        self._next_event_id = 0
        # The host tier (off with 0 slots, or without prefix caching).
        self.num_host_blocks = num_host_blocks if enable_prefix_caching else 0
        self._host: OrderedDict[int, _HostEntry] = OrderedDict()  # block hash -> entry, oldest first
        self._host_free: list[int] = list(range(self.num_host_blocks - 1, -1, -1))  # free slots (pop: lowest)
        self._tokens: dict[int, tuple[int, ...]] = {}  # hash -> token ids of a device-cached block (tier on)
        self._host_copies: list[HostCopy] = []  # decided, not yet taken by the engine
        self.host_stats = HostTierStats()

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_host_cached_blocks(self) -> int:
        return len(self._host)

    @property
    def next_event_id(self) -> int:
        """The id the next KV event will carry."""
        return self._next_event_id

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    def match_prefix(self, token_ids: Sequence[int]) -> list[int | HostBlock]:
        """The longest cached prefix of ``token_ids``, a block each: a device block id, or a
        :class:`HostBlock` where only the host tier holds it (:meth:`allocate` loads it). Leaves at
        least one token uncovered (its logits must be computed). Changes nothing."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int | HostBlock] = []
        parent = NONE_HASH
        limit = (len(token_ids) - 1) // self.block_size
        for i in range(limit):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = self._cached.get(parent)
            if block_id is not None:
                matched.append(block_id)
            elif parent in self._host:
                matched.append(HostBlock(parent))
            else:
                break
        return matched

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, cached_blocks: Sequence[int | HostBlock] = (),
                 reserve: int = 0) -> list[int] | None:
        """Grow the request's table so it covers ``num_tokens`` tokens.

        ``cached_blocks`` (from :meth:`match_prefix`, first call only): device blocks are shared,
        not copied; each :class:`HostBlock` takes a free device block and queues its load.
        All or nothing: returns the newly allocated block ids (loads not counted), or None if there
        are not enough free blocks, or if fewer than ``reserve`` would be left free (nothing changes then)."""
        table = self._tables.get(request_id)
        if table is not None and cached_blocks:
            raise ValueError(f"request {request_id}: cached blocks can only be taken on first allocation")
        have = len(table) if table is not None else len(cached_blocks)
        need = -(-num_tokens // self.block_size) - have
        loads = [b for b in cached_blocks if isinstance(b, HostBlock)]
        # Cached blocks we are about to take may sit in the evictable pool: not available.
        reclaimed = sum(1 for b in cached_blocks if isinstance(b, int) and self.ref_counts[b] == 0)
        if max(need, 0) + len(loads) + reserve > self.num_free_blocks - reclaimed:
            return None
        if table is None:
            table = self._tables[request_id] = []
            # The device blocks are taken first (out of the evictable pool), then the host ones get
            # fresh blocks: their hashes stay in the host tier meanwhile (``keep``), whatever the
            # evictions this makes offload.
            for b in cached_blocks:
                if isinstance(b, int):
                    self._take(b)
            keep = {b.block_hash for b in loads}
            table.extend(b if isinstance(b, int) else self._load(b.block_hash, self._pop_free(keep))
                         for b in cached_blocks)
            self._chain[request_id] = [self.block_hashes[b] for b in table]
        new_blocks = [self._pop_free() for _ in range(max(need, 0))]
        table.extend(new_blocks)
        return new_blocks

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record that the first ``num_computed_tokens`` of ``token_ids`` are in the cache:
        full blocks among them become findable by later requests."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        chain = self._chain[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        bs = self.block_size
        while len(chain) < num_full:
            i = len(chain)
            parent = chain[-1] if chain else NONE_HASH
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            block_hash = hash_block(parent, tokens)
            chain.append(block_hash)
            block_id = table[i]
            if block_hash in self._cached or self.block_hashes[block_id] is not None:
                continue  # an identical block is already cached: keep ours private
            self._cache(block_id, block_hash, parent, tokens)
            self._emit(BlockStored, block_hash=block_hash, parent_hash=parent, token_ids=tokens)

    def free(self, request_id: str) -> None:
        """Drop the request's references. Its cached blocks stay findable until evicted; the
        tail of the sequence is evicted before its head."""
        table = self._tables.pop(request_id, None)
        self._chain.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.appendleft(block_id)  # the table's head ends up first

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give ``child_id`` the parent's first ``num_tokens`` tokens of KV: full blocks are
        shared; a partial last block gets a private copy. Returns the ``(src, dst)`` block
        copies the caller must make (empty when none), or None when out of blocks."""
        if child_id in self._tables:
            raise ValueError(f"request {child_id} already has blocks")
        parent = self._tables[parent_id]
        num_full, partial = divmod(num_tokens, self.block_size)
        if partial and not self._free and not self._evictable:
            return None
        table = self._tables[child_id] = []
        for block_id in parent[:num_full]:
            self._take(block_id)
            table.append(block_id)
        self._chain[child_id] = list(self._chain.get(parent_id, [])[:num_full])
        if not partial:
            return []
        dst = self._pop_free()
        table.append(dst)
        return [(parent[num_full], dst)]

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash, on the device and in the host tier (the blocks' contents are
        not touched; copies decided already still run). The blocks that held them are reused
        first, in id order (a sequence's blocks then lie in address order)."""
        self._free.extendleft(sorted(self._evictable, reverse=True))
        self._evictable.clear()
        self._cached.clear()
        self._parents.clear()
        self._tokens.clear()
        self._host.clear()
        self._host_free = list(range(self.num_host_blocks - 1, -1, -1))
        self.block_hashes = [None] * self.num_blocks
        for chain in self._chain.values():
            chain.clear()
        self._emit(AllBlocksCleared)

    def forget_device(self) -> None:
        """Forget every hash cached on the device and keep the host tier (a park: the device
        cache's contents go, host memory stays). Each device hash gets ``BlockRemoved(device)``, so
        the routers' indexes keep the host entries; with nothing in the host tier, one
        ``AllBlocksCleared`` (:meth:`reset_prefix_cache`). Copies decided already still run; the
        blocks are reused first, in id order."""
        if not self._host:
            self.reset_prefix_cache()
            return
        for block_hash in self._cached:
            self._emit(BlockRemoved, block_hash=block_hash)
        self._free.extendleft(sorted(self._evictable, reverse=True))
        self._evictable.clear()
        self._cached.clear()
        self._parents.clear()
        self._tokens.clear()
        self.block_hashes = [None] * self.num_blocks
        for chain in self._chain.values():
            chain.clear()

    def snapshot(self) -> tuple[list[tuple[int, int]], int]:
        """Every block cached on the device as ``(hash, parent hash)``, and the id the next event
        will get: applying events from that id on to the snapshot (and :meth:`host_snapshot`'s,
        taken with it) keeps an index exact."""
        return list(self._parents.items()), self._next_event_id

    def host_snapshot(self) -> list[tuple[int, int]]:
        """Every block the host tier holds, as ``(hash, parent hash)``."""
        return [(h, e.parent_hash) for h, e in self._host.items()]

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def take_host_copies(self) -> list[HostCopy]:
        """The copies decided since the last call, in order. The caller runs them, in this order,
        before anything else reads or writes the blocks involved (a step, a KV transfer)."""
        copies, self._host_copies = self._host_copies, []
        return copies

    # ---- internals -----------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self._evictable[block_id]
        self.ref_counts[block_id] += 1

    def _cache(self, block_id: int, block_hash: int, parent: int, tokens: tuple[int, ...]) -> None:
        """Make a device block findable under ``block_hash``."""
        self.block_hashes[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._parents[block_hash] = parent
        if self.num_host_blocks:
            self._tokens[block_hash] = tokens

    def _pop_free(self, keep: set[int] | frozenset[int] = frozenset()) -> int:
        """A block for new contents (ref 1): a free one, else the least recently used cached one,
        evicted (to the host tier when it has room; never over the host hashes in ``keep``)."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block_hash = self.block_hashes[block_id]
            self.block_hashes[block_id] = None
            del self._cached[block_hash]
            parent = self._parents.pop(block_hash)
            tokens = self._tokens.pop(block_hash, ())
            if self.num_host_blocks:
                self._offload(block_id, block_hash, parent, tokens, keep)
            self._emit(BlockRemoved, block_hash=block_hash)
        self.ref_counts[block_id] = 1
        if block_id >= self.frontier:
            self.frontier = block_id + 1
        return block_id

    def _offload(self, block_id: int, block_hash: int, parent: int, tokens: tuple[int, ...],
                 keep: set[int] | frozenset[int]) -> None:
        """An evicted device block goes to the host tier (unless its hash is there already): a free
        slot, else the host LRU's oldest not in ``keep``; none such, it is dropped."""
        entry = self._host.get(block_hash)
        if entry is not None:
            self._host.move_to_end(block_hash)
            return
        if self._host_free:
            slot = self._host_free.pop()
        else:
            victim = next((h for h in self._host if h not in keep), None)
            if victim is None:
                self.host_stats.num_dropped += 1
                return
            slot = self._host.pop(victim).slot
            self.host_stats.num_evicted += 1
            self._emit(BlockRemoved, block_hash=victim, medium=Medium.HOST)
        self._host[block_hash] = _HostEntry(slot, parent, tokens)
        self._host_copies.append(HostCopy(True, block_id, slot))
        self.host_stats.num_offloaded += 1
        self._emit(BlockStored, block_hash=block_hash, parent_hash=parent, token_ids=tokens, medium=Medium.HOST)

    def _load(self, block_hash: int, block_id: int) -> int:
        """Device block ``block_id`` (fresh, ref 1) takes the host tier's copy of ``block_hash``:
        findable on the device again; its host copy stays (most recently used)."""
        entry = self._host[block_hash]
        self._host.move_to_end(block_hash)
        self._cache(block_id, block_hash, entry.parent_hash, entry.token_ids)
        self._host_copies.append(HostCopy(False, block_id, entry.slot))
        self.host_stats.num_loaded += 1
        self._emit(BlockStored, block_hash=block_hash, parent_hash=entry.parent_hash, token_ids=entry.token_ids)
        return block_id

    def _emit(self, kind: type, **fields: object) -> None:
        self._events.append(kind(event_id=self._next_event_id, **fields))
        self._next_event_id += 1
