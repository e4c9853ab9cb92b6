"""KV-cache blocks: which sequence holds which block, and the prefix cache over full blocks.

The cache is cut into fixed-size blocks of BLOCK_SIZE positions; a sequence's block table lists its blocks
in position order. A full block whose keys and values are computed is registered under a hash chain of its
tokens (the hash of the previous block's key and this block's tokens), so a later sequence starting with
the same tokens takes the block instead of prefilling it again. Blocks are reference counted; a block no
sequence holds stays cached until it is needed for new content, the least recently released first.
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK_SIZE = 16  # positions per block: small enough that a block table wastes little, large enough to index cheaply


class OutOfBlocks(Exception):
    """Fewer free blocks than asked for; the scheduler waits or preempts and tries again."""


class _Block:
    __slots__ = ("refs", "key", "tokens")

    def __init__(self):
        self.refs = 0
        self.key: int | None = None  # its prefix-cache key while registered
        self.tokens: tuple[int, ...] = ()  # what it holds, to tell a hash collision from a hit


def chain_key(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int = BLOCK_SIZE, prefix_cache: bool = True):
        if n_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {n_blocks}")
        self.n_blocks, self.block_size, self.prefix_cache = n_blocks, block_size, prefix_cache
        self._blocks = [_Block() for _ in range(n_blocks)]
        self._empty = list(range(n_blocks - 1, -1, -1))  # unheld and holding nothing cached: used first
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld but registered, least recently released first
        self._by_key: dict[int, int] = {}
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache, and the ones found
        self.hit_tokens = 0

    @property
    def free(self) -> int:
        """Blocks a sequence can take now (cached ones are evicted for it)."""
        return len(self._empty) + len(self._cached)

    @property
    def used(self) -> int:
        return self.n_blocks - self.free

    @property
    def cached(self) -> int:
        """Registered blocks no sequence holds, kept for future prefix hits."""
        return len(self._cached)

    def refs(self, block: int) -> int:
        return self._blocks[block].refs

    def allocate(self, n: int) -> list[int]:
        """n blocks for new content: empty ones first, then the least recently released cached ones."""
        if n > self.free:
            raise OutOfBlocks(f"{n} blocks asked for, {self.free} free")
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                blk = self._blocks[b]
                del self._by_key[blk.key]
                blk.key, blk.tokens = None, ()
            self._blocks[b].refs = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a sequence's table, in order)."""
        for b in reversed(blocks):  # a chain's tail goes first, so it is evicted before the prefix it extends
            blk = self._blocks[b]
            if blk.refs <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            blk.refs -= 1
            if blk.refs == 0:
                if blk.key is None:
                    self._empty.append(b)
                else:
                    self._cached[b] = None

    def match(self, tokens: list[int], limit: int) -> tuple[list[int], list[int]]:
        """The longest run of cached full blocks that starts `tokens` and covers at most `limit` positions:
        (their ids, their chain keys). Each one found is taken (a reference each)."""
        if not self.prefix_cache:
            return [], []
        bs, found, keys, parent = self.block_size, [], [], None
        for at in range(0, limit - bs + 1, bs):
            chunk = tuple(tokens[at:at + bs])
            key = chain_key(parent, chunk)
            b = self._by_key.get(key)
            if b is None or self._blocks[b].tokens != chunk:
                break
            blk = self._blocks[b]
            if blk.refs == 0:
                del self._cached[b]
            blk.refs += 1
            found.append(b)
            keys.append(key)
            parent = key
        return found, keys

    def note_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one admitted prompt toward the hit rate (a lookup that had to wait is not counted twice)."""
        self.queried_tokens += prompt_tokens
        self.hit_tokens += cached_tokens

    def register(self, block: int, parent: int | None, tokens: tuple[int, ...]) -> int:
        """Make a computed full block findable by later sequences; returns its chain key. When another
        block already holds the same prefix, that one stays the one found and this one stays private."""
        key = chain_key(parent, tokens)
        if self.prefix_cache and key not in self._by_key:
            blk = self._blocks[block]
            blk.key, blk.tokens = key, tokens
            self._by_key[key] = block
        return key

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
