"""Decoding's attention with each passage's keys and values read once for all its questions.

A batch's rows are questions on a few passages (``model.prefix``). Copied into every row, a
passage's keys and values would be read once per question at every decoding step, and they are
most of the cache (GPT-2 small, 48 rows: ~1 GB a step, a third of the step's time). Here they stay
one copy per passage, a :class:`SharedPrefix` beside the rows' own cache, and an attention
function registered with transformers (:data:`NAME`) reads them:

- a decoding step (one new token a row) scores each passage's questions together, as the
  query rows of one product with that passage's keys; each row's own columns (its question and
  answer so far) are scored as usual; one softmax over both, then the same two products with
  the values; in float32 whatever the model's dtype, as SDPA's kernels accumulate;
- a prefill (several tokens a row) puts each row's passage in front of its own columns for that
  call alone and runs SDPA, as if the passage had been copied into the row (with many tokens a
  row, SDPA's kernel beats the products above: 600 SmolLM2 questions, 60-61 s against 62-63).

A grouped-query model's key/value heads are used as they are: in the products the query heads of
a group fold into the rows; in SDPA, on a CPU in float32, torch reads them shared. The function
runs where ``kwargs`` reach the attention (transformers' models with
``_supports_attention_backend``) in SDPA mode (``model.support``). It mirrors what transformers'
SDPA function does with what the model hands it; where a model hands it more (a position bias,
attention sinks, soft-capping, value heads of another width), it raises :class:`NotMirrored` on
the first call and the model is answered by the copies' path (``inference.paths``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loraqa_shared_prefix"
UNMIRRORED = ("position_bias", "s_aux", "sinks", "softcap")  # what SDPA's function would use and this one does not


class NotMirrored(ValueError):
    """The model's attention asks for something the shared-passage attention does not compute."""


@dataclass
class SharedPrefix:
    """The passages' keys and values, (G, kv heads, P, head dim) per layer; ``mask`` (G, P) their
    real slots; ``row_group`` (R,) each row's passage. Set by :meth:`regroup`: ``slot`` and
    ``per_group``, each row's place when the rows are laid out ``per_group`` to a passage, and
    ``bias`` (R, 1, 1, P), 0 where a row attends to its passage's slot and the lowest float where
    not. Set by :meth:`step` for a decoding step: ``filled``, the rows' own cache columns in use (a
    step reads only those) and ``own_bias`` (R, 1, 1, filled)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    row_group: torch.Tensor
    filled: int = 0
    own_bias: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    per_group: int = 0
    bias: torch.Tensor | None = None
    _own_from: torch.Tensor | None = None

    def step(self, own_mask: torch.Tensor) -> None:
        """A decoding step: ``own_mask`` (R, filled) the rows' own columns they attend to."""
        self.filled = own_mask.size(1)
        self.own_bias = _bias(own_mask[:, None, None])

    def own(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(R, 1, T, columns) the additive mask of the rows' own columns: the decoding step's, or
        from transformers' mask (the same object for every layer of a forward: made once)."""
        if self.filled:
            return self.own_bias
        if attention_mask is None:  # not from ``_mask``
            raise ValueError("shared_prefix_attention needs the attention mask")
        if self.own_bias is None or self._own_from is not attention_mask:
            self.own_bias, self._own_from = _bias(attention_mask), attention_mask
        return self.own_bias

    def regroup(self, row_group: torch.Tensor) -> None:
        """Set the rows' passages (rows left or joined): each row's slot among its passage's rows."""
        self.row_group = row_group
        self.bias = _bias(self.mask[row_group][:, None, None])
        counts = torch.bincount(row_group, minlength=self.mask.size(0))
        self.per_group = int(counts.max()) if len(row_group) else 0
        order = row_group.argsort(stable=True)
        rank = torch.empty_like(row_group)
        rank[order] = torch.arange(len(row_group), device=row_group.device) - (counts.cumsum(0) - counts)[row_group[order]]
        self.slot = row_group * self.per_group + rank

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` go on. Passages none of them read are dropped once they are half of the
        passages (each drop copies the rest; a step reads every passage kept)."""
        self.row_group = self.row_group[rows]
        used = torch.unique(self.row_group)
        if 2 * len(used) <= self.mask.size(0):
            self._only(used)
        self.regroup(self.row_group)

    def _only(self, used: torch.Tensor) -> None:
        """Keep passages ``used`` (sorted) alone."""
        self.keys, self.values = [k[used] for k in self.keys], [v[used] for v in self.values]
        renumber = torch.zeros(self.mask.size(0), dtype=torch.long, device=used.device)
        renumber[used] = torch.arange(len(used), device=used.device)
        self.mask, self.row_group = self.mask[used], renumber[self.row_group]

    def rows(self, a: int, b: int) -> SharedPrefix:
        """The same passages for rows a..b only (a prefill run)."""
        part = SharedPrefix(self.keys, self.values, self.mask, self.row_group[a:b])
        part.regroup(part.row_group)
        return part

    def reading(self) -> SharedPrefix:
        """A copy with only the passages its rows read."""
        part = SharedPrefix(self.keys, self.values, self.mask, self.row_group)
        part._only(torch.unique(self.row_group))
        return part

    def take_in(self, carried: SharedPrefix) -> None:
        """Rows carried from the batch before join after this batch's, and their passages go into
        the last ``carried``'s passages of room (left empty, masked, by the caller): a passage may
        end before the others' width, its last slots masked."""
        start = self.mask.size(0) - carried.mask.size(0)
        for mine, theirs in zip(self.keys + self.values, carried.keys + carried.values):
            mine[start:, :, :theirs.size(2)] = theirs
        self.mask[start:, :carried.mask.size(1)] = carried.mask
        self.regroup(torch.cat([self.row_group, carried.row_group + start]))


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix: SharedPrefix | None = None, **kwargs):
    """transformers' attention interface: (R, heads, T, head dim) in, (R, T, heads, head dim) out.
    Without ``shared_prefix`` (the passages' own prefill), SDPA."""
    if shared_prefix is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    asked = [k for k in UNMIRRORED if kwargs.get(k) is not None]
    if asked or value.size(-1) != query.size(-1) or not getattr(module, "is_causal", True):
        raise NotMirrored(f"{type(module).__name__} hands attention {', '.join(asked) or 'other value widths or bidirectional heads'}")
    pk, pv = shared_prefix.keys[module.layer_idx], shared_prefix.values[module.layer_idx]
    rows, heads, tokens, dim = query.shape
    groups, kv_heads, width = pk.size(0), pk.size(1), pk.size(2)
    rep, n, slot = heads // kv_heads, shared_prefix.per_group, shared_prefix.slot
    if tokens > 1:  # a prefill: each row's passage in front of its own columns (faster than below at many tokens)
        group = shared_prefix.row_group
        prefix_mask = shared_prefix.mask[group][:, None, None, :].expand(-1, 1, tokens, -1)
        return _sdpa(module, query, torch.cat([pk[group], key], 2), torch.cat([pv[group], value], 2),
                     torch.cat([prefix_mask, attention_mask], -1), scaling, dropout, **kwargs)
    if shared_prefix.filled:  # a decoding step: only the filled columns
        key, value = key[:, :, :shared_prefix.filled], value[:, :, :shared_prefix.filled]
    own_bias = shared_prefix.own(attention_mask)

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (R, heads, T, c) -> (G, kv heads, n x rep x T, c)
        c = x.size(-1)
        out = x.new_zeros(groups * n, heads, tokens, c)
        out[slot] = x
        return out.view(groups, n, kv_heads, rep, tokens, c).transpose(1, 2).reshape(groups, kv_heads, n * rep * tokens, c)

    def ungrouped(x: torch.Tensor) -> torch.Tensor:  # the inverse
        c = x.size(-1)
        x = x.view(groups, kv_heads, n, rep, tokens, c).transpose(1, 2)
        return x.reshape(groups * n, heads, tokens, c)[slot]

    # in float32 whatever the model's dtype, as SDPA's kernels accumulate (bf16 products rounded
    # to bf16 moved answers); for a float32 model, .float() is the tensor itself
    with torch.autocast(query.device.type, enabled=False):
        q = query.float() * (dim ** -0.5 if scaling is None else scaling)
        passage = ungrouped(grouped(q) @ pk.float().transpose(-1, -2))  # (R, heads, T, P)
        mine = q.reshape(rows, kv_heads, rep * tokens, dim) @ key.float().transpose(-1, -2)
        weights = torch.cat([passage + shared_prefix.bias, mine.view(rows, heads, tokens, -1) + own_bias], -1).softmax(-1)
        out = ungrouped(grouped(weights[..., :width]) @ pv.float())
        mine = weights[..., width:].reshape(rows, kv_heads, rep * tokens, -1) @ value.float()
        out = out + mine.view(rows, heads, tokens, dim)
    return out.to(query.dtype).transpose(1, 2), None


def _sdpa(module, query, key, value, mask, scaling, dropout, **kwargs):
    """SDPA. transformers copies a grouped-query model's key/value heads per query head for a masked
    SDPA (``repeat_kv``); in float32 on a CPU, torch's kernel reads them shared: the same numbers."""
    if query.device.type == "cpu" and query.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """An additive float32 mask: 0 where ``mask`` is true, the lowest float where not (finite, as
    transformers' eager attention does: a row with nothing to attend to, a pad, stays finite)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask.bool(), torch.finfo(torch.float32).min)


def _mask(*args, allow_is_causal_skip: bool = True, **kwargs):
    """transformers' SDPA mask, never skipped for ``is_causal``: the rows' own columns are only part of what they attend."""
    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


AttentionInterface.register(NAME, shared_prefix_attention)
AttentionMaskInterface.register(NAME, _mask)


@contextmanager
def prefix_attention(lm):
    """``lm`` attends through :func:`shared_prefix_attention` (given a ``shared_prefix`` kwarg;
    otherwise as SDPA does) inside the block."""
    before = lm.config._attn_implementation
    lm.config._attn_implementation = NAME
    try:
        yield
    finally:
        lm.config._attn_implementation = before
