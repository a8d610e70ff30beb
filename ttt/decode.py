"""Continuous batching of answers: every answer being decoded advances one token per step, in ONE forward.

Shape legend:
    B  rows: answers in the batch, each with its own session's fast weights (or none: the base model)
    T  new tokens per row in a forward (1 when decoding; the longest prefill piece, up to ``prefill_chunk``)
    C  tokens of keys/values a pool slot holds (the longest row's prompt + max_tokens)
    R  LoRA rank, padded with zeros to the largest in the batch (zero rows add exactly nothing)

A row is a ``generate.TokenStream``: it owns its prompt, sampling state and text, and a slot of the
``AnswerPool`` holds its keys and values. A step (``DecodeBatch.prefill``, then ``decode``) prefills new rows
in pieces (so that a long prompt delays the others by at most one piece per step; the pieces of several rows in
one forward, padded to the longest), which gives the rows whose prompt is done their first token, and then runs
one forward over every decoding row:
its LoRA projections go through ``kernels.multi_lora`` with each row's own A and B, and its attention
through ``cache.RaggedCache``, which masks each row to its own keys. Rows join at any step and leave as
soon as they finish or are dropped. Slots stay compact: rows [0, decoding) decode, at most one row after
them is part way through its prefill; rows that joined wait in line, without a slot, until theirs starts.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

from kernels.multi_lora import multi_lora_linear

from .cache import RaggedCache
from .fast_weights import ExtraMLPLayer, FastWeights, LoRALayer, projection
from .model import ModelConfig, Transformer

if TYPE_CHECKING:
    from .generate import TokenStream


class AnswerPool:
    """Keys and values of the rows being decoded: per layer one [slots, kv_heads, C, head_dim] tensor, grown
    as rows need (held within ``budget`` bytes; while it grows, the old and the new tensors briefly coexist)
    and freed when the last row leaves. C only grows while rows are held: one long answer lowers how many rows
    fit until the batch empties."""

    def __init__(self, cfg: ModelConfig, device, dtype, budget: int | None = None, max_slots: int = 1 << 30):
        self.cfg, self.device, self.dtype, self.budget, self.max_slots = cfg, device, dtype, budget, max_slots
        self.token_bytes = (
            2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
        )
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @property
    def slots(self) -> int:
        k = self.k  # one read: /metrics calls this from another thread
        return k[0].shape[0] if k else 0

    @property
    def capacity(self) -> int:
        k = self.k
        return k[0].shape[2] if k else 0

    def num_bytes(self) -> int:
        k = self.k
        return k[0].shape[0] * k[0].shape[2] * self.token_bytes if k else 0

    def fits(self, rows: int, tokens: int, alone: bool = False) -> bool:
        """Whether ``rows`` rows of up to ``tokens`` tokens each fit the budget, next to the longest row held now
        (``alone``: in an empty pool)."""
        longest = tokens if alone else max(tokens, self.capacity)
        return self.budget is None or rows * longest * self.token_bytes <= self.budget

    def reserve(self, rows: int, tokens: int) -> None:
        """Make room for ``rows`` rows of ``tokens`` tokens, keeping the rows held (slots may double, within
        the budget, so that joins rarely copy)."""
        capacity = max(tokens, self.capacity)
        if rows <= self.slots and capacity == self.capacity:
            return
        slots = max(rows, min(2 * self.slots, self._most_slots(capacity), self.max_slots))
        shape = (slots, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        old_k, old_v = self.k, self.v
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.cfg.num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.cfg.num_layers)]
        kept = min(slots, old_k[0].shape[0]) if old_k else 0  # a longer capacity may leave room for fewer slots
        for new, old in zip(self.k + self.v, old_k + old_v, strict=False):
            new[:kept, :, : old.shape[2]] = old[:kept]

    def _most_slots(self, capacity: int) -> int:
        return self.budget // (capacity * self.token_bytes) if self.budget is not None else 1 << 30

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s keys and values into slot ``dst``."""
        for t in self.k + self.v:
            t[dst] = t[src]

    def release(self) -> None:
        self.k, self.v = [], []

    def view(self, start: int, stop: int, lengths: list[int]) -> RaggedCache:
        """Slots [start, stop) as the cache of one forward; ``lengths``: the tokens each holds."""
        return RaggedCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v], lengths)


class RowsLayer:
    """One layer's fast weights for B rows (a ``model.LayerAdapter``): row b's LoRA A and B in row b of a
    stacked tensor (zeros where its session has none), and the extra-MLP layers of the rows that have them."""

    def __init__(
        self,
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
        mlp: list[tuple[int, ExtraMLPLayer]],
        rows: int,
        tokens: int = 1,
    ):
        self.lora = lora  # name -> (A [B, R, in], B [B, out, R] with the row's scale folded in)
        self.mlp = mlp
        device = next(iter(lora.values()))[0].device if lora else None
        # row b's tokens are rows [b * T, (b + 1) * T) of the flattened input
        self.seg_offsets = torch.arange(0, (rows + 1) * tokens, tokens, device=device) if lora else None

    def linear(self, name: str, x: torch.Tensor, base) -> torch.Tensor:
        # x: [B, T, in] -> [B, T, out]
        if name not in self.lora:
            return base(x)
        a, b = self.lora[name]
        y = multi_lora_linear(x.flatten(0, 1), base.weight, base.bias, a, b, self.seg_offsets, 1.0)
        return y.view(*x.shape[:2], -1)

    def after_block(self, h: torch.Tensor) -> torch.Tensor:
        # h: [B, T, D]
        if self.mlp:
            h = h.clone()
            for row, layer in self.mlp:
                h[row : row + 1] = layer.after_block(h[row : row + 1])
        return h


def stack_rows(model: Transformer, fasts: list[FastWeights | None], dtype, tokens: int = 1) -> dict[int, RowsLayer]:
    """The fast weights of B rows (None: the base model) of ``tokens`` tokens each as one adapter per layer any
    of them has."""
    layers = sorted({i for f in fasts if f is not None for i in f.layer_ids})
    out = {}
    for i in layers:
        mine = [f.per_layer[str(i)] if f is not None and i in f.layer_ids else None for f in fasts]
        loras = [m if isinstance(m, LoRALayer) else None for m in mine]
        names = sorted({n for m in loras if m is not None for n in m.lora_A})
        rank = max((m.lora_A[n].shape[0] for m in loras if m is not None for n in m.lora_A), default=0)
        lora = {}
        for n in names:
            out_f, in_f = projection(model, i, n).weight.shape
            a = torch.zeros(len(fasts), rank, in_f, device=model.embed_tokens.weight.device, dtype=dtype)
            b = torch.zeros(len(fasts), out_f, rank, device=a.device, dtype=dtype)
            for row, m in enumerate(loras):
                if m is not None and n in m.lora_A:
                    r = m.lora_A[n].shape[0]
                    a[row, :r] = m.lora_A[n]
                    b[row, :, :r] = m.lora_B[n] * m.scale
            lora[n] = (a, b)
        mlp = [(row, m) for row, m in enumerate(mine) if isinstance(m, ExtraMLPLayer)]
        out[i] = RowsLayer(lora, mlp, len(fasts), tokens)
    return out


class DecodeBatch:
    """The answers being decoded; ``step`` advances each by one token (and prefills new ones in pieces)."""

    def __init__(
        self, model: Transformer, *, kv_budget: int | None = None, max_rows: int = 64, prefill_chunk: int = 512
    ):
        weight = model.embed_tokens.weight
        self.model, self.max_rows, self.prefill_chunk = model, max_rows, prefill_chunk
        self.pool = AnswerPool(model.cfg, weight.device, weight.dtype, kv_budget, max_rows)
        self.rows: list[TokenStream] = []  # slot order: [0, decoding) decode, then at most one row prefilling
        self.waiting: deque[TokenStream] = deque()  # joined, no slot yet: their prefill starts in this order
        self.decoding = 0
        self._adapters: dict[int, RowsLayer] | None = None  # of rows [0, decoding); rebuilt when they change

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def needs(self, row: TokenStream) -> int:
        """Tokens of keys/values the row can reach: its prompt and every token it may sample."""
        return len(row.prompt) + row.params.max_tokens

    def fits(self, rows: list[TokenStream]) -> bool:
        """Whether ``rows`` can join now (row count and key/value budget)."""
        count = len(self) + len(rows)
        tokens = max(self.needs(r) for r in [*rows, *self.waiting])  # the waiting rows hold no slot yet
        return count <= self.max_rows and self.pool.fits(count, tokens)

    def fits_alone(self, rows: list[TokenStream]) -> bool:
        """Whether ``rows`` could ever join (in an empty batch)."""
        return len(rows) <= self.max_rows and self.pool.fits(len(rows), max(self.needs(r) for r in rows), alone=True)

    def join(self, row: TokenStream) -> None:
        """``row`` waits in line; its prefill starts when the rows before it have finished theirs."""
        self.waiting.append(row)

    def _start(self, row: TokenStream) -> None:
        """Give ``row`` the next slot (with its window's keys/values, when it has them)."""
        slot = len(self.rows)
        # room for the rows in line behind it too (``fits`` counted them): a burst of joins grows the pool once, not
        # at every doubling of its slots and every longer row (in the load test's first seconds, under memory
        # pressure, two growths took 4.4 and 7.7 s while every answer waited)
        line = [row, *self.waiting]
        self.pool.reserve(slot + len(line), max(self.needs(r) for r in line))
        self.rows.append(row)
        if row.prefix is not None:  # the window's keys/values, computed once per version of the session
            for layer, (k, v) in enumerate(zip(row.prefix.k, row.prefix.v, strict=True)):
                self.pool.k[layer][slot, :, : row.filled] = k[0, :, : row.filled]
                self.pool.v[layer][slot, :, : row.filled] = v[0, :, : row.filled]

    def drop(self, row: TokenStream) -> None:
        """Take ``row`` out of the batch (finished, or its client has gone)."""
        if row in self.waiting:
            self.waiting.remove(row)
        else:
            slot, last = self.rows.index(row), len(self.rows) - 1
            if slot < self.decoding:  # the last decoding row fills the hole, the prefilling one (if any) moves up
                self._adapters = None
                self.decoding -= 1
                self._move(self.decoding, slot)
                self._move(last, self.decoding)
            self.rows.pop()
        if not len(self):
            self.pool.release()

    def clear(self) -> None:
        """Every row leaves at once (after a failed step: their state is not trusted)."""
        self.rows, self.decoding, self._adapters = [], 0, None
        self.waiting.clear()
        self.pool.release()

    def _move(self, src: int, dst: int) -> None:
        if src != dst:
            self.pool.move(src, dst)
            self.rows[dst] = self.rows[src]

    def step(self) -> list[TokenStream]:
        """``prefill``, then ``decode``: the rows that changed in each (a row that took its first token in the
        prefill and its second in the decode, twice)."""
        return self.prefill() + self.decode()

    @torch.no_grad()
    def prefill(self) -> list[TokenStream]:
        """The next prompt pieces of the rows in line (``prefill_chunk`` tokens in all); the rows whose prompt is
        done take their first token and start decoding. Returns the rows that changed (new text, logprobs or an
        end); finished rows have left."""
        return self._leave(self._prefill())

    @torch.no_grad()
    def decode(self) -> list[TokenStream]:
        """One token for every decoding row. Returns the rows that changed; finished rows have left."""
        return self._leave(self._decode()) if self.decoding else []

    def _leave(self, changed: list[TokenStream]) -> list[TokenStream]:
        for row in changed:
            if row.finish_reason is not None:
                self.drop(row)
        return changed

    def _prefill(self) -> list[TokenStream]:
        """The next prompt pieces of the rows in line (``_pieces``) in one forward; the rows whose prompt is done
        start decoding."""
        pieces = self._pieces()
        logits = self._prefill_together(pieces) if len(pieces) > 1 else [self._prefill_alone(*p) for p in pieces]
        changed = []
        for (row, piece), row_logits in zip(pieces, logits, strict=True):
            row.prefilled(piece, row_logits)
            if row.filled == len(row.prompt):  # only the last piece can be cut short: slots stay compact
                self.decoding += 1
                self._adapters = None
                changed.append(row)
        return changed

    def _pieces(self) -> list[tuple[TokenStream, list[int]]]:
        """(row, its next prompt tokens) for the rows from slot ``decoding`` on, in line order, starting the
        rows in line as the budget reaches them: ``prefill_chunk`` tokens, pads included (a long piece does not
        share a forward with many short ones); a row ``_alone`` goes alone."""
        pieces, budget, slot, longest = [], self.prefill_chunk, self.decoding, 0
        while budget > 0 and (slot < len(self.rows) or self.waiting):
            row = self.rows[slot] if slot < len(self.rows) else self.waiting[0]
            piece = row.prompt[row.filled : row.filled + budget]
            longest = max(longest, len(piece))
            padded = (len(pieces) + 1) * longest
            if pieces and (self._alone(row) or self._alone(pieces[0][0]) or padded > self.prefill_chunk):
                break
            if slot == len(self.rows):
                self._start(self.waiting.popleft())
            pieces.append((row, piece))
            budget -= len(piece)
            slot += 1
        return pieces

    @staticmethod
    def _alone(row: TokenStream) -> bool:
        """A row prefilled in a forward of its own: one scoring its prompt (echo) needs every position's logits,
        and one that samples nothing may fill its slot to the last column, where padded rows write."""
        return row.scores_prompt or row.params.max_tokens == 0

    def _prefill_alone(self, row: TokenStream, piece: list[int]) -> torch.Tensor:
        cache = self.pool.view(self.decoding, self.decoding + 1, [row.filled])
        adapters = row.fast.adapters() if row.fast is not None else None
        tokens = torch.tensor([piece], device=self.pool.device)
        return self.model(tokens, adapters, cache, last_only=not row.scores_prompt)[0]  # [T or 1, V]

    def _prefill_together(self, pieces: list[tuple[TokenStream, list[int]]]) -> list[torch.Tensor]:
        """Pieces of B rows in one forward, padded to the longest (T): on a GPU, B prompts cost about what one
        does. A pad's key and value land in its row's slot at its position, or past the slot's end in its last
        column (``RaggedCache``), which the row's own prompt never reaches; its output is not read. Returns each
        row's last logits [1, V]."""
        rows, lengths = [r for r, _ in pieces], [len(p) for _, p in pieces]
        B, T = len(pieces), max(lengths)
        tokens = torch.tensor([p + [0] * (T - len(p)) for _, p in pieces], device=self.pool.device)  # [B, T]
        cache = self.pool.view(self.decoding, self.decoding + B, [r.filled for r in rows])
        adapters = stack_rows(self.model, [r.fast for r in rows], self.pool.dtype, T)
        h = self.model.run_layers(self.model.embed(tokens), 0, self.model.cfg.num_layers, adapters, cache)
        ends = torch.tensor(lengths, device=h.device) - 1
        last = h[torch.arange(B, device=h.device), ends]  # [B, D]: each row's last real token
        return list(self.model.logits(last[:, None]))

    def _decode(self) -> list[TokenStream]:
        rows = self.rows[: self.decoding]
        if self._adapters is None:
            self._adapters = stack_rows(self.model, [r.fast for r in rows], self.pool.dtype)
        tokens = torch.tensor([[r.next_input] for r in rows], device=self.pool.device)  # [B, 1]
        cache = self.pool.view(0, len(rows), [r.filled for r in rows])
        logits = self.model(tokens, self._adapters, cache)[:, 0]  # [B, V]
        for row, row_logits in zip(rows, logits, strict=True):
            row.filled += 1
            row.accept(row_logits)
        return rows
