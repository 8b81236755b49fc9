"""Rows of several LoRA adapters in one forward over one base model: each adapted linear layer
(:class:`MultiLoRA`) holds every adapter's A stacked, (K r, in), and its scaled B stacked, (out, K r).
A forward runs the base layer once for all rows, then:

- all rows ask one adapter: two products with its r columns alone (none for the base);
- a decoding step (one token a row) whose rows ask most of the stacked adapters: two products over
  the whole stack, each row keeping only its own adapter's r columns between them (a mask): no
  gathers, no Python per row or adapter;
- a prefill (many tokens a row), or a step whose rows ask few of them: each adapter's tokens through
  its slice alone (a gather each), as computing (and reading) every adapter's columns costs more there.

A layer may receive its input as (rows, tokens, width) or flattened to (tokens, width), rows first
(OPT's MLP, Qwen2-MoE's shared expert): either way each token gets its row's adapter, from the
forward's tokens a row (:class:`Router`, told by a hook on the model). A layer that sees only some
of the tokens (a mixture of experts' routed experts) cannot be routed: :class:`UnroutableMix`.

Which adapter each row asks is set around each forward (:func:`routing`, by ``inference.decoder``),
as the passages of ``model.prefix_attention`` are.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from loraqa.model.load import base_model

BASE = "__base__"  # a row that asks no adapter


class UnroutableMix(RuntimeError):
    """A layer's tokens cannot be told apart by row (it sees a subset of them, as a mixture of
    experts' routed experts do): rows of different adapters cannot share this forward."""


class Router:
    """The adapter each row of the forward running now asks (None: no forward, or the base), and
    that forward's (rows, tokens a row), recorded as the model is called (:meth:`AdapterSet.__init__`)."""

    def __init__(self) -> None:
        self.names: list[str | None] | None = None
        self.only: str | None = None  # the one adapter every row asks, where they ask one
        self.mixed = False
        self.asked: set = set()
        self.tokens = 1               # tokens a row in the forward running now
        self._masks: dict[tuple, torch.Tensor] = {}

    def per_row(self, tokens: int) -> int:
        """How many of a layer's ``tokens`` (its input flattened to (tokens, width), rows first, as
        OPT's MLP and Qwen2-MoE's shared expert receive it) belong to each row; ``UnroutableMix``
        where they do not divide by row."""
        rows = len(self.names)
        if tokens == rows * self.tokens:
            return self.tokens
        if tokens == rows:  # a layer that sees each row's last token alone (a head under logits_to_keep=1)
            return 1
        raise UnroutableMix(f"a layer sees {tokens} tokens for {rows} rows of {self.tokens}")

    def mask(self, layout: tuple[tuple[str, int, int], ...], per_row: int, device, dtype) -> torch.Tensor:
        """(tokens, stacked r) ones where each token's row's adapter's columns are, for a stack
        ``layout`` [(handle, start, end)]; made once per forward and layout, shared by the layers."""
        key = (layout, per_row, device, dtype)
        if key not in self._masks:
            mask = torch.zeros(len(self.names), layout[-1][2], device=device, dtype=dtype)
            where = {name: (start, end) for name, start, end in layout}
            for row, name in enumerate(self.names):
                if name in where:
                    mask[row, where[name][0]:where[name][1]] = 1
            self._masks[key] = mask.repeat_interleave(per_row, 0) if per_row > 1 else mask
        return self._masks[key]

    def rows(self, name: str, per_row: int, device) -> torch.Tensor | None:
        """The tokens (of ``per_row`` a row) whose row asks ``name`` (None: none), made once per forward."""
        key = ("rows", name, per_row, device)
        if key not in self._masks:
            picked = [i * per_row + t for i, n in enumerate(self.names) if n == name for t in range(per_row)]
            self._masks[key] = torch.tensor(picked, dtype=torch.long, device=device) if picked else None
        return self._masks[key]

    def set(self, names: list[str | None] | None) -> None:
        self.names, self._masks = names, {}
        self.asked = set(names or ())
        self.mixed = len(self.asked) > 1
        self.only = next(iter(self.asked)) if len(self.asked) == 1 else None

    def heard(self, module, args, kwargs) -> None:
        """A forward pre-hook on the base model: the tokens a row of this forward."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        if ids is not None and ids.dim() >= 2:
            self.tokens = ids.shape[1]


class MultiLoRA(nn.Module):
    """A linear layer (or GPT-2's Conv1D) with several adapters' LoRA over its one weight."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.base, self.router = base, router
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # handle -> (A, scaled B)
        self.layout: tuple[tuple[str, int, int], ...] = ()
        self.a = self.b = None

    def restack(self) -> None:
        """The stacks from ``parts``, in the base weight's dtype and device."""
        weight = self.base.weight
        self.layout, start = (), 0
        for name, (a, _) in self.parts.items():
            self.layout += ((name, start, start + a.shape[0]),)
            start += a.shape[0]
        if self.parts:
            self.a = torch.cat([a for a, _ in self.parts.values()]).to(weight.device, weight.dtype)   # (K r, in)
            self.b = torch.cat([b for _, b in self.parts.values()], 1).to(weight.device, weight.dtype)  # (out, K r)
        else:
            self.a = self.b = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        router = self.router
        if self.a is None or not (router.mixed or router.only):
            return y
        if not router.mixed:  # one adapter for every row: its slice alone
            span = next(((s, e) for n, s, e in self.layout if n == router.only), None)
            if span is not None:
                y.add_((x @ self.a[span[0]:span[1]].T) @ self.b[:, span[0]:span[1]].T)
            return y
        # rows of several adapters: the input as (tokens, width), rows first (a layer may receive it
        # flattened so, or (rows, tokens, width)), each token getting its row's adapter
        y = y if y.is_contiguous() else y.contiguous()
        flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        per_row = router.per_row(flat.shape[0])
        present = [(n, s, e) for n, s, e in self.layout if n in router.asked]
        # a prefill, or a step whose rows ask few of the stacked adapters (reading the whole stack would
        # cost more): each adapter's tokens through its slice alone
        if per_row > 1 or 2 * len(present) <= len(self.layout):
            for name, start, end in present:
                rows = router.rows(name, per_row, x.device)
                if rows is not None:
                    out.index_add_(0, rows, (flat[rows] @ self.a[start:end].T) @ self.b[:, start:end].T)
            return y
        out.add_(((flat @ self.a.T) * router.mask(self.layout, per_row, x.device, x.dtype)) @ self.b.T)
        return y


@contextmanager
def routing(model, names: list[str | None] | None):
    """Rows ask the adapters ``names`` (one per row: a handle, or None / BASE for none) inside the block."""
    router = getattr(base_model(model), "_loraqa_router", None)
    if router is None or names is None:
        yield
        return
    router.set([None if n == BASE else n for n in names])
    try:
        yield
    finally:
        router.set(None)
