"""What attention reads besides the new tokens: the caches of keys and values, and RoPE.

``KVCache``: one answer's rotated keys/values, preallocated. ``RaggedCache``: rows of different lengths decoding
together (``ttt.decode``), each row masked to its own keys. ``RollingContext``: the keys/values of the tokens a
chunk attends to while it trains (attention sinks + the most recent window), never re-run through the model.
Shapes as in ``ttt.model``'s legend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.attention import decode_attention

if TYPE_CHECKING:
    from .model import ModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; cos, sin: [T, hd]
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Decoding cache: rotated keys and values, preallocated [B, kv_heads, max_len, head_dim] per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0  # tokens already stored; advanced by Transformer.forward
        self.max_len = max_len

    def advance(self, n: int) -> None:
        self.length += n

    def extend(self, layer: int, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys (un-rotated, [B, kvh, T, hd]) and values; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} tokens")
        self.k[layer][:, :, self.length : end] = apply_rope(k, cos[self.length :], sin[self.length :])
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RaggedCache:
    """Keys and values of B answers of different lengths, decoded together (``ttt.decode``).

    ``k``, ``v``: per layer [B, kv_heads, C, head_dim] (views of the answer pool); row b holds ``lengths[b]``
    tokens, rotated at their own positions, and a forward's T new tokens of row b go at positions
    lengths[b] .. lengths[b] + T - 1. Keys past a row's length are masked, whatever they hold.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], lengths: list[int]):
        self.k, self.v = k, v
        self.lengths = torch.tensor(lengths, device=k[0].device)  # [B]
        self.length = max(lengths)  # the longest row: rope tables and keys are cut at length + T

    def advance(self, n: int) -> None:
        self.lengths += n
        self.length += n

    def attend(self, layer: int, q, k, v, rope, window: int | None) -> torch.Tensor:
        # q: [B, H, T, hd]; k, v: [B, kvh, T, hd] un-rotated; rope: (cos, sin) [length + T, hd] -> [B, H, T, hd]
        B, T = q.shape[0], q.shape[2]
        pos = self.lengths[:, None] + torch.arange(T, device=q.device)  # [B, T]
        cos, sin = rope[0][pos][:, None], rope[1][pos][:, None]  # [B, 1, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = torch.arange(B, device=q.device)[:, None]
        # rows prefilled together are padded to the longest piece: a pad past the slot's end writes its last
        # column (``DecodeBatch._prefill_together``); a row's own token there is written before it is read
        capacity = self.k[layer].shape[2]
        at = pos.clamp(max=capacity - 1)
        self.k[layer][rows, :, at] = k.transpose(1, 2)  # advanced indices first: [B, T, kvh, hd]
        self.v[layer][rows, :, at] = v.transpose(1, 2)
        n = min(self.length + T, capacity)
        keys = torch.arange(n, device=q.device)
        visible = keys <= pos[:, :, None]  # [B, T, n]
        if window is not None:  # from the column written: a pad past the slot's end sees at least its own
            visible &= keys > at[:, :, None] - window
        if T == 1:
            return decode_attention(q, self.k[layer][:, :, :n], self.v[layer][:, :, :n], visible[:, None])
        return F.scaled_dot_product_attention(
            q, self.k[layer][:, :, :n], self.v[layer][:, :, :n], attn_mask=visible[:, None], enable_gqa=True
        )


class RollingContext:
    """The unlabelled context of the next ingest chunk: cached keys and values per layer.

    This is sliding-window attention across chunks (TTT-E2E): a chunk attends to the cached keys and values
    of the tokens before it instead of re-running them, so each token passes the model once. The cache holds
    the document's first ``sink`` tokens (attention sinks: without them a window that starts mid-text loses
    about 1 nat/token, as StreamingLLM found) and its last ``size`` tokens. Keys are kept un-rotated and
    re-rotated at positions [0, length + T) every chunk, so positions stay small however long the document.
    Every forward records its own keys/values; ``commit`` keeps those of the last forward.
    """

    def __init__(self, num_layers: int, size: int, sink: int = 4):
        self.size, self.sink = size, sink
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self._new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        k = next((t for t in self.k if t is not None), None)
        return 0 if k is None else k.shape[2]

    def extend(self, layer: int, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        self._new[layer] = (k.detach(), v.detach())
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        return apply_rope(k, cos, sin), v

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[2] <= self.sink + self.size:
            return t
        return torch.cat([t[:, :, : self.sink], t[:, :, t.shape[2] - self.size :]], dim=2)

    def commit(self, drop_last: int = 0) -> None:
        """Roll the window forward over the last forward's tokens, except its final ``drop_last`` ones."""
        for layer, (k, v) in self._new.items():
            k, v = k[:, :, : k.shape[2] - drop_last], v[:, :, : v.shape[2] - drop_last]
            if self.k[layer] is not None:
                k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
            self.k[layer], self.v[layer] = self._keep(k).contiguous(), self._keep(v).contiguous()
        self._new.clear()

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
