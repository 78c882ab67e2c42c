"""Per-example clipping of a linear output head that :func:`dpkd.fused_linear_distill_loss` multiplies
without forming full-batch logits.

The head's gradient G_i = sum_t dz_t h_t^T (dz: d loss / d logits, [V] per token) exists only chunk by
chunk, and the clipping coefficients are known only once the whole model's backward pass has run, after
the chunks are gone. So the loss's chunk loop measures each example's squared norm as it goes -- ghost
norms sum_{t,s in i} (h_t . h_s)(dz_t . dz_s) inside chunks made of whole examples; an example with more
tokens than a chunk has its gradient instantiated ([V, H] in fp32) across its chunks -- and the step
recomputes each chunk's dz (the same ops on the same rows: the same bits, assumed -- no kernel here has atomics,
and cuBLAS repeats a product of one shape bit for bit on one GPU) to form sum_i c_i G_i. That
second pass costs the two models' logits again (about 60-80% of the head's non-private work) instead of
the [N, V] output gradient that the engine would otherwise keep, which is what the fused loss avoids.
A head tied to the input embedding adds the cross term 2 <G_emb_i, G_i> = 2 sum_{s,t} dz_s[x_t] (h_s . e_t) to the
norms: the chunk loop keeps dz_s[x_t] for each example's head tokens s and input ids x_t, the step multiplies
it with the embedding's captured output gradients e_t.
"""

from __future__ import annotations

import typing

import torch

from .. import _mixed, _ops
from . import layers

# A tied head keeps its examples' dz_s[x_t] blocks from the chunk loop up to this many values in all (256 MB in fp32);
# past it the cross term recomputes them.
PICKED_BUDGET = 1 << 26

# rows (flattened token indices) -> (their hidden states [c, H], d loss / d logits [c, V] times ``unscale``'s inverse)
ChunkGradient = typing.Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Chunk(typing.NamedTuple):
    """Tokens active[start:end]: whole examples of ``sizes`` tokens each, or (``part``) a part of one example
    longer than a chunk, ``last`` its last."""
    start: int
    end: int
    sizes: tuple[int, ...] = ()
    part: bool = False
    last: bool = False
    examples: tuple[int, ...] = ()  # the examples it holds (known on the host: no device read per chunk)


def pack_examples(counts: list[int], chunk: int) -> list[Chunk]:
    """Chunks over tokens ordered by example, ``counts[e]`` of example e: consecutive whole examples up to
    ``chunk`` tokens, and an example with more tokens than that in parts of ``chunk`` tokens of its own."""
    out, sizes, held, pos = [], [], [], 0

    def close():
        if sizes:
            out.append(Chunk(pos - sum(sizes), pos, tuple(sizes), examples=tuple(held)))
            sizes.clear()
            held.clear()

    for example, n in enumerate(counts):
        if n == 0:
            continue
        if n > chunk:
            close()
            out.extend(Chunk(s, min(s + chunk, pos + n), (), True, s + chunk >= pos + n, (example,))
                       for s in range(pos, pos + n, chunk))
        else:
            if sum(sizes) + n > chunk:
                close()
            sizes.append(n)
            held.append(example)
        pos += n
    close()
    return out


class PrivateHead:
    """One use of a head inside the fused loss: the examples' squared norms and split-error bounds, measured
    by :meth:`observe` during the chunk loop, and the chunks to recompute for :meth:`clipped_sums`.

    ``active``: the flattened indices of the tokens that carry loss (ascending), ``tokens_per_row`` per batch row;
    ``unscale``: the factor that takes the chunk loop's logit gradients to the loss's (an fp16 loss scales them);
    ``hidden``: the hidden states [N, H];
    ``tied_ids``: for a head tied to an embedding, the ids [B, T'] that embedding read: the chunk loop keeps each
    example's logit gradients at its own ids, dz_s[x_t], for the cross term with the embedding's gradient."""

    def __init__(self, engine, name: str, active: torch.Tensor, tokens_per_row: int, rows: int, chunk: int, *,
                 weight: bool, bias: bool, unscale: float, accum: torch.dtype,
                 checked: list[torch.Tensor], hidden: torch.Tensor,
                 tied_ids: torch.Tensor | None = None) -> None:
        k = engine.rows_per_example
        if rows % k:
            raise ValueError(f"{rows} batch rows do not split into examples of {k} rows")
        self.engine, self.name, self.active, self.examples = engine, name, active, rows // k
        self.example = torch.div(active, tokens_per_row * k, rounding_mode="floor")
        examples, example = self.examples, self.example
        self.weight, self.bias, self.unscale, self.accum = weight, bias, unscale, accum
        self.split: bool | None = None  # whether the clipped sums multiply bf16 parts (layers.splits), at observe
        self.entry, self.rows, self.rows_per_example = engine.head_entry(), rows, k
        counts = torch.bincount(example, minlength=examples).tolist() if example.numel() else [0] * examples
        self.chunks = pack_examples(counts, chunk)
        # Every chunk's examples on the device, copied once: chunk k's are _chunk_examples[_offsets[k.start]:...]
        offsets, flat = {}, []
        for ch in self.chunks:
            offsets[ch.start] = len(flat)
            flat.extend(ch.examples)
        self._offsets = offsets
        self._chunk_examples = torch.tensor(flat, dtype=torch.long, device=example.device)
        self.sq = torch.zeros(examples, dtype=accum, device=example.device)
        self.nonfinite = torch.zeros(examples, dtype=torch.bool, device=example.device)
        self.sq_hidden = torch.zeros_like(self.sq)  # ||H_i||^2, ||dZ_i||^2 for the split's error bounds
        self.sq_grad = torch.zeros_like(self.sq)
        self._part_w: torch.Tensor | None = None  # an instantiated example's gradient, across its parts
        self._part_b: torch.Tensor | None = None
        self.checked = [(t, t._version) for t in checked]  # what the recomputation reads
        self.gradient: ChunkGradient | None = None
        self.grad_out: float | None = None  # the upstream gradient of the loss, once backward delivered it
        self.margin: torch.Tensor | None = None
        self.hidden = hidden.detach()  # read by the cross term, which must build no graph
        # Tied: each example's ids [E, k T'], and per example the (head rows, dz at its ids [rows, k T']) pieces,
        # kept from the chunk loop up to PICKED_BUDGET values in all; past it the cross term recomputes them from the
        # chunks (one more pass over the head, as the step's: the (head tokens) x (input tokens) blocks of long OPD
        # examples reach gigabytes).
        self.tied_ids = None if tied_ids is None else tied_ids.reshape(examples, tied_ids.numel() // max(examples, 1))
        self.keep_picked = self.tied_ids is not None and active.numel() * self.tied_ids.shape[1] <= PICKED_BUDGET
        self.picked: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(self, chunk: Chunk, h: torch.Tensor, g: torch.Tensor, loss: torch.Tensor,
                stats: torch.Tensor) -> None:
        """Add a chunk's contribution (hidden rows ``h``, logit gradients ``g``, per-token ``loss`` and ``stats``) to
        the norms. An example with a non-finite logit gets a NaN norm: the engine drops it."""
        with _mixed.no_autocast([h.device.type]):  # the norms in self.accum, whatever the loss ran under
            self._observe(chunk, h, g, loss, stats)

    def _observe(self, chunk: Chunk, h: torch.Tensor, g: torch.Tensor, loss: torch.Tensor,
                 stats: torch.Tensor) -> None:
        e = self.example[chunk.start:chunk.end]
        if self.keep_picked:
            for i, rows, block in self._chunk_blocks(chunk, g):
                self.picked.setdefault(i, []).append((rows, block))
        # the statistics' entropies are NaN where a row's logits are not finite: the kernels may pass over a NaN
        bad = ~torch.isfinite(loss) | _ops.flagged_rows(stats)
        self.nonfinite.index_put_((e,), bad, accumulate=True)
        self.split = layers.splits(h, g)
        u = self.unscale
        if self.split:
            self.sq_hidden.index_add_(0, e, h.to(self.accum).pow(2).sum(1))
            self.sq_grad.index_add_(0, e, g.to(self.accum).pow(2).sum(1) * u * u)
        if chunk.part:
            if self.weight:
                w = _mixed.matmul(g.t(), h).mul_(u)
                self._part_w = w if self._part_w is None else self._part_w.add_(w)
            if self.bias:
                b = g.to(self.accum).sum(0).mul_(u)
                self._part_b = b if self._part_b is None else self._part_b.add_(b)
            if chunk.last:
                total = sum(p.pow(2).sum() for p in (self._part_w, self._part_b) if p is not None)
                self.sq.index_add_(0, e[:1], total.reshape(1).to(self.accum))
                self._part_w = self._part_b = None
            return
        sizes, c = chunk.sizes, chunk.end - chunk.start
        if len(sizes) == 1 or len(sizes) > 64 or 4 * sum(n * n for n in sizes) > c * c:
            # One Gram pair for the chunk, pairs of different examples masked out (by where: another example's NaN
            # must not reach this one's norm): fewer, larger matmuls where the examples' blocks fill the chunk.
            pairs = self._ghost_pairs(h, g)
            if len(sizes) > 1:
                pairs = torch.where(e[:, None] == e[None, :], pairs, 0)
            self.sq.index_add_(0, e, pairs.sum(1).to(self.accum))
            return
        # Each example's own Gram pair: sum_i T_i^2 products instead of the chunk's c^2.
        sq, at = [], 0
        for n in sizes:
            sq.append(self._ghost_pairs(h[at:at + n], g[at:at + n]).sum())
            at += n
        first = self._offsets[chunk.start]
        self.sq.index_add_(0, self._chunk_examples[first:first + len(sizes)], torch.stack(sq).to(self.accum))

    def _chunk_blocks(self, chunk: Chunk, g: torch.Tensor):
        """(example i, head rows, dz_s[x_t]) for the chunk's head tokens s and their example's ids x_t (a [rows, k T']
        block per example, in the loss's units)."""
        rows = self.active[chunk.start:chunk.end]
        at = 0
        for n, i in zip(chunk.sizes or (chunk.end - chunk.start,), chunk.examples):
            yield i, rows[at:at + n], g[at:at + n].index_select(1, self.tied_ids[i]).to(self.accum) * self.unscale
            at += n

    def _blocks(self):
        """Every example's dz_s[x_t] blocks: kept from the chunk loop, or recomputed chunk by chunk."""
        if self.keep_picked:
            for i, pieces in self.picked.items():
                for rows, block in pieces:
                    yield i, rows, block
            return
        self._check_unchanged()
        for chunk in self.chunks:
            with torch.no_grad():
                _, g = self.gradient(self.active[chunk.start:chunk.end])
            yield from self._chunk_blocks(chunk, g)

    def cross(self, ids: torch.Tensor, g_emb: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        """<embedding's per-example gradient, this head use's> per example, in the delivered units: sum over the
        example's head tokens s and input tokens t of dz_s[x_t] (h_s . e_t), e the embedding's output gradients
        (grouped [E, k T', H], as ``ids``); the padding row gets no embedding gradient."""
        if self.tied_ids is None or not torch.equal(ids, self.tied_ids):
            raise ValueError("the tied embedding's ids at the step differ from those the fused loss read (the "
                             "embedding ran again, on other ids, or only after the loss)")
        e = g_emb.to(self.accum)
        if padding_idx is not None:
            e = e * (ids != padding_idx)[..., None]
        out = torch.zeros(self.examples, dtype=self.accum, device=e.device)
        with _mixed.no_autocast([e.device.type]):  # a recomputation sets the loss's autocast state itself
            for i, rows, block in self._blocks():
                dots = self.hidden[rows].to(self.accum) @ e[i].t()  # [rows, k T']
                out[i] += (block * dots).sum()
        return out * self.grad_out

    def _ghost_pairs(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[(h_t . h_s)(dz_t . dz_s)] (weight) + [dz_t . dz_s] (bias) over the rows given."""
        gram = _mixed.matmul(g, g.t()).mul_(self.unscale * self.unscale)
        pairs = gram * _mixed.matmul(h, h.t()) if self.weight else None
        if self.bias:
            pairs = gram if pairs is None else pairs + gram
        return pairs

    def deliver(self, grad_out: torch.Tensor) -> None:
        """From the loss's backward: scale by the upstream gradient and hand this use to the engine."""
        self.grad_out = float(grad_out)
        self.sq = torch.where(self.nonfinite, float("nan"), self.sq * self.grad_out**2)
        if self.split:  # see layers.split_error_bounds
            self.margin = layers.SPLIT_ROUNDOFF * abs(self.grad_out) * (self.sq_hidden * self.sq_grad).sqrt()
        self.sq_hidden = self.sq_grad = None
        self.engine.receive_head(self.name, self)

    def clipped_sums(self, coef: layers.Coefficients) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """sum_i c_i G_i for the weight ([V, H], fp32) and the bias, in the units of the delivered gradient, from
        the chunks recomputed; examples with c_i = 0 left out whatever their values."""
        self._check_unchanged()
        with torch.no_grad():  # as the loss's forward ran: no graph through the hidden states and the weight
            return self._clipped_sums(coef)

    def _check_unchanged(self) -> None:
        for t, version in self.checked:
            if t._version != version:
                raise RuntimeError("a tensor that dpkd.fused_linear_distill_loss read (hidden states, head weight or "
                                   "bias, labels, weights) was modified in place between backward() and the step: "
                                   "the step recomputes the head's per-example gradients from them")

    def _clipped_sums(self, coef: layers.Coefficients) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w_sum = b_sum = None
        for chunk in self.chunks:
            e = self.example[chunk.start:chunk.end]
            keep = coef.keep[e]
            h, g = self.gradient(self.active[chunk.start:chunk.end])
            c = coef.c[e] * (self.grad_out * self.unscale)
            if self.weight:
                part = layers.linear_clipped_sum(h[:, None], g[:, None], layers.Coefficients(c, keep), split=self.split)
                w_sum = part if w_sum is None else w_sum.add_(part)
            if self.bias:
                part = torch.where(keep[:, None], g.to(self.accum) * c[:, None].to(self.accum), 0).sum(0)
                b_sum = part if b_sum is None else b_sum.add_(part)
        return w_sum, b_sum

    def release(self) -> None:
        """Drop what the recomputation holds (hidden states, the teacher's): the autograd graph may outlive the
        step."""
        self.gradient, self.checked, self.chunks, self.hidden, self.picked = None, [], [], None, {}



