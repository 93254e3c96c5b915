"""The paged KV cache of one shard: a pool of fixed-size blocks shared by every sequence, and its sizing.

``k[layer]``, ``v[layer]``: [num_blocks, block_size, kv_heads, head_dim] (one tensor per cache, every layer in it). A
sequence owns a list of block ids (its block table, kept on the host by the engine); token position ``p`` of a
sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``, in every layer. Blocks are handed out
and taken back on the host (a free list), so allocation never touches the device.

Prefix cache: a full block of a prompt is registered under the hash of everything up to its end (``prefix_hashes``:
the token ids, the media parts' tensor keys, and a salt, the tenant's cache namespace). A new sequence whose prompt
starts the same way takes those blocks instead of computing them (``share``); a block is counted by the sequences
holding it, and one that none holds keeps its content, evictable (least recently released first) whenever the free
list runs out. Only blocks whose every position is computed (on every shard) are registered, and a shared block is
never written: a sequence's own positions start past its shared blocks.

Every shard of a pipeline replica holds its own pool for its own layers, with the same number of blocks: each sizes
its pool from its own memory (``--gpu-memory-utilization`` of the device's memory, after the weights and the
activation peak of a ``--max-batched-tokens`` step, or ``--kv-cache-gb``) and the replica agrees on the smallest
(backbone/pipeline.py), so one block table, chosen by shard 0, is valid on every shard.
"""

from __future__ import annotations

import hashlib
import mmap
from array import array
from collections import OrderedDict

import torch

BLOCK_SIZE = 16  # tokens per block: a power of two (the Triton kernel's tile), small enough to waste little


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        # One block more than is handed out: the padding block, where the padding rows of a CUDA-graph decode step
        # (backbone/graphs.py) write their K/V. Its id, ``num_blocks``, is the same on every shard of a replica.
        shape = (num_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        # Zeroed: attention reads a block's unwritten slots (masked, weight 0) and 0 x NaN garbage would be NaN.
        self.k, self.v = _zeros(shape, dtype, device), _zeros(shape, dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.padding_block = num_blocks  # never in the free list
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self._refs = [0] * num_blocks  # sequences holding each block (a shared prefix block: several)
        self._hash: dict[int, bytes] = {}  # registered block -> the hash of the prefix it ends
        self._by_hash: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, held by none: evicted oldest first
        self.hits = 0  # blocks a sequence took from the prefix cache instead of computing them

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free(self) -> int:
        """Blocks a sequence may take: never used, or holding a prefix nobody holds now (evicted when taken)."""
        return len(self._free) + len(self._idle)

    @property
    def cached(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._hash)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend ``table`` to hold ``tokens`` positions; False (nothing taken) if the pool has too few blocks."""
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > self.free:
            return False
        for _ in range(need):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)
        return True

    def _evict(self) -> int:
        block, _ = self._idle.popitem(last=False)
        del self._by_hash[self._hash.pop(block)]
        return block

    def share(self, hashes: list[bytes]) -> list[int]:
        """The registered blocks of the longest run of ``hashes`` (a prompt's full blocks, in order), each now held
        once more: the start of a block table whose positions need no computing."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            blocks.append(block)
        self.hits += len(blocks)
        return blocks

    def sole(self, table: list[int]) -> int:
        """Blocks of ``table`` that no other table holds: what releasing it would give back."""
        return sum(1 for block in set(table) if 0 <= block < self.num_blocks and self._refs[block] == 1)

    def register(self, block: int, h: bytes) -> None:
        """``block``, every position of it computed, ends the prefix ``h``: later prompts may share it. The first
        block registered under a hash keeps it."""
        if h not in self._by_hash and block not in self._hash and 0 <= block < self.num_blocks:
            self._hash[block], self._by_hash[h] = h, block

    def release(self, table: list[int]) -> None:
        """Give back a table's hold on its blocks (and empty it); a block nobody holds goes back to the free list, or,
        registered, stays in the prefix cache until evicted. Only blocks held are given back, each once per table: a
        stale or corrupted table cannot put a block in two sequences."""
        seen = set()
        for block in reversed(table):  # a prefix's last blocks are evicted before its first
            if 0 <= block < self.num_blocks and self._refs[block] > 0 and block not in seen:
                seen.add(block)
                self._refs[block] -= 1
                if self._refs[block]:
                    continue
                if block in self._hash:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V as [(num_blocks + 1) * block_size, kv_heads, head_dim] (slot-indexed views)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed tensor. On a CPU it maps anonymous memory, which the kernel hands out zeroed and commits only when
    written: a pool sized for every sequence's full context costs the memory its sequences actually use."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = max(1, torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
    buf = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def prefix_hashes(token_ids: list[int], media: list[tuple[str, str, int]], placeholder_ids: dict[str, int],
                  block_size: int = BLOCK_SIZE, salt: str = "") -> list[bytes]:
    """One hash per full block of a prompt, each of everything up to the block's end: the token ids and, for a
    block where media parts begin, their keys (``media``: (modality, key, rows) in prompt order, each key naming a
    tensor's content, whose ``rows`` fill that modality's next placeholder positions, as backbone/fusion.py splices
    them). ``salt`` (the tenant's cache namespace) starts the chain, so tenants share no blocks (their timings would
    tell one what another sent)."""
    starts: list[tuple[int, str]] = []  # (first placeholder position, key)
    for modality, placeholder in placeholder_ids.items():
        positions = [i for i, t in enumerate(token_ids) if t == placeholder]
        at = 0
        for mod, key, rows in media:
            if mod == modality and rows > 0:
                starts.append((positions[at] if at < len(positions) else len(token_ids), key))
                at += rows
    starts.sort(key=lambda s: s[0])
    h = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    out, at = [], 0
    for end in range(block_size, len(token_ids) + 1, block_size):
        block = hashlib.blake2b(h, digest_size=16)
        block.update(array("q", token_ids[end - block_size : end]).tobytes())
        while at < len(starts) and starts[at][0] < end:
            block.update(b"\0" + starts[at][1].encode())
            at += 1
        h = block.digest()
        out.append(h)
    return out


def blocks_in_budget(budget_bytes: int, block_bytes: int) -> int:
    """Blocks to hand out within a budget (the pool's padding block counts against it)."""
    return max(0, int(budget_bytes) // block_bytes - 1)


CPU_DEFAULT_BYTES = 4 * 2**30  # a CPU pool holds max_running full contexts, at most this much


def activation_bytes(model, max_batched_tokens: int, max_running: int) -> int:
    """A step's transient memory at most (an estimate, on the safe side): per token the q/k/v/o rows, the MLP's
    gate, up and product, a few hidden-state copies; the sampled rows' logits in fp32 and the sampler's sort
    buffers; 256 MiB for the allocator's slack and cuBLAS workspaces."""
    cfg, itemsize = model.cfg, torch.empty((), dtype=model.dtype).element_size()
    per_token = 2 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * cfg.intermediate_size \
        + 6 * cfg.hidden_size
    return max_batched_tokens * per_token * itemsize + max_running * cfg.vocab_size * 4 * 6 + 256 * 2**20


def pool_blocks(model, kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                max_batched_tokens: int = 2048, max_running: int = 16, max_context: int = 4096,
                share: int = 1, block_size: int = BLOCK_SIZE) -> int:
    """How many blocks this shard's pool may take (its own layers only).

    ``kv_cache_bytes`` given: that much. On a GPU: ``gpu_memory_utilization`` of the device's memory, less what is
    in use now (this process's weights, and anything other processes hold), less a step's activations, split
    evenly between the ``share`` shards that run on this same GPU. On a CPU: room for ``max_running`` sequences of
    ``max_context`` tokens, at most 4 GiB."""
    block = model.block_bytes(block_size)
    if kv_cache_bytes is not None:
        return blocks_in_budget(kv_cache_bytes, block)
    if model.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model.device)
        budget = (gpu_memory_utilization * total - (total - free)) / max(1, share)
        return blocks_in_budget(budget - activation_bytes(model, max_batched_tokens, max_running), block)
    full = max_running * -(-max_context // block_size) * block
    return blocks_in_budget(min(full, CPU_DEFAULT_BYTES), block)
