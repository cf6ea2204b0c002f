"""A per-row KV cache with slot = sequence position, so rows can sit at different lengths.

Speculative decoding accepts a different number of drafted tokens per sample; with slot = position a rollback is
just `lengths[b] = n`: stale slots past `n` are masked out causally and overwritten by the next write.
Rows may be left-padded (NextStep-1 pads prompts on the left): `start[b]` is the first real slot of row b.

`static=True` (the compiled decode path, fastardiff_ds/sampling/compiled.py): attention always reads the whole
preallocated buffer (B, max_len, ...) and the causal mask hides unwritten and stale slots, so every decode step
of a given width has the same shapes and a compiled graph (or a CUDA graph) is reused for the whole image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, max_len, n_kv, head_dim)
    values: list[torch.Tensor]  # per layer (B, max_len, n_kv, head_dim)
    lengths: torch.Tensor  # (B,) long: slots written so far
    start: torch.Tensor  # (B,) long: first real (non-pad) slot
    static: bool = False  # attend over the full buffer (fixed shapes for torch.compile / CUDA graphs)

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
              device=None, dtype=torch.float32, static: bool = False) -> "KVCache":
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        zeros = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        long = dict(device=device, dtype=torch.long)
        return cls([zeros() for _ in range(num_layers)], [zeros() for _ in range(num_layers)],
                   torch.zeros(batch_size, **long), torch.zeros(batch_size, **long), static)

    def mark_static_addresses(self) -> "KVCache":
        """Tell torch.compile the buffers never move (CUDA graphs then replay without copying them)."""
        import torch._dynamo

        for t in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(t)
        return self

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def slots(self, num_new: int) -> torch.Tensor:
        """(B, T) slots the next `num_new` tokens of every row go to; raises if the cache would overflow."""
        need = int(self.lengths.max()) + num_new
        if need > self.max_len:
            raise ValueError(f"KV cache overflow: need {need} slots, cache holds {self.max_len}; "
                             "build the cache with a larger max_len (prompt length + image tokens + draft length)")
        return self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)[None]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, T, n_kv, d) keys/values at `slots`; return the cache prefix covering every written slot."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.keys[layer][rows, slots] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, slots] = v.to(self.values[layer].dtype)
        if self.static:
            return self.keys[layer], self.values[layer]
        end = int(slots.max()) + 1
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, num_new: int) -> None:
        self.lengths = self.lengths + num_new

    def rollback(self, new_lengths: torch.Tensor) -> None:
        """Truncate each row to `new_lengths` (B,); must not grow a row."""
        new_lengths = new_lengths.to(self.lengths)
        if bool((new_lengths > self.lengths).any()) or bool((new_lengths < self.start).any()):
            raise ValueError("rollback may only shorten rows, and not into their left padding")
        self.lengths = new_lengths.clone()

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache holding only `rows` (copies)."""
        return KVCache([k[rows].clone() for k in self.keys], [v[rows].clone() for v in self.values],
                       self.lengths[rows].clone(), self.start[rows].clone(), self.static)

    def clone(self) -> "KVCache":
        return self.select(torch.arange(self.batch_size, device=self.lengths.device))
