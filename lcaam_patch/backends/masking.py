"""The one place where upstream masks are read: hard masks, soft biases, causality, dead rows.

The guarantee every backend meets through this module:

- A key is *hard-masked* for a query when the upstream mask says so with a False entry of
  a bool mask or a -inf entry of a float mask, or when `is_causal` puts it after the query.
  A hard-masked key gets weight exactly 0 and passes no gradient to q, k, v or M, for any
  value of M: before fusion, M is set to the fusion's neutral value at every key that is
  hard-masked in every head, so even a non-finite M there has no effect.
- Finite entries of a float mask are *soft*: added to the fused scores, as upstream adds
  them, so a large S·M can outweigh them. Adapters whose upstream writes hard masks as a
  large finite negative number (BERT's -10000, `finfo.min`) turn them into -inf with
  `harden` (`finite_hard_mask` for `finfo.min`) first.
- Keys that are hard-masked for every query and head of their sample (key padding) are
  zeroed in k and v (and in a factorized M's key factor) before any backend sees them, so
  whatever those keys hold cannot overflow a fused score into a NaN.
- A query whose keys are all hard-masked (a *dead row*) gets output 0 and no gradient,
  never NaN. Where an upstream writes its hard masks as a large finite number and its own
  softmax therefore averages a dead row uniformly (transformers' eager masks, `finfo.min`),
  the adapter reproduces that average with `finite_hard_mask` and `uniform_dead_rows`: the
  mean of v over every key, with no gradient to q, k or M.
- M is cast to the dtype a backend computes in with saturation, so a finite M stays finite
  in half precision; a non-finite M at a key that is attended is not a mask and gives a
  non-finite output there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .call import NEUTRAL, AttentionCall, LowRankMask


def causal_keep(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) bool, True where key j <= query i (top-left aligned)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


class UpstreamMask:
    """The upstream mask of one call, split into what hides keys and what shifts scores.

    Built once per call and never changed afterwards (every backend of the call reads it);
    calls with no upstream mask and no causality share `NO_UPSTREAM_MASK`.

    Attributes:
        keep: bool (B|1, H|1, Nq|1, Nk), False where the upstream mask hard-masks a key
            (causality not included); None when it hard-masks nothing.
        bias: the finite part of a float upstream mask, 4-D; None when there is none.
        causal: whether keys after the query are hard-masked too (of the `nq` queries and
            `nk` keys, on `device`, that the constructor takes for that).
    """

    __slots__ = ("_dead_rows", "_full_keep", "bias", "causal", "keep")

    def __init__(
        self,
        keep: torch.Tensor | None,
        bias: torch.Tensor | None,
        causal: bool,
        nq: int = 0,
        nk: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.keep, self.bias, self.causal = keep, bias, causal
        # computed once here: every backend asks for them, several times per call
        full = keep
        if causal:
            assert device is not None, "a causal split needs the call's nq, nk and device"
            tril = causal_keep(nq, nk, device)
            full = tril if keep is None else keep & tril
        if full is None:
            self._full_keep: torch.Tensor | None = None
            self._dead_rows: torch.Tensor | None = None
            return
        full = _as_4d(full)
        self._full_keep = full
        self._dead_rows = None if keep is None else ~full.any(dim=-1, keepdim=True)

    def full_keep(self) -> torch.Tensor | None:
        """`keep` with causality folded in; None when nothing is hard-masked."""
        return self._full_keep

    def dead_rows(self) -> torch.Tensor | None:
        """bool (.., Nq, 1), True for queries with every key hard-masked; None if none can be
        (only the upstream mask can empty a row: causality always keeps key 0)."""
        return self._dead_rows

    def additive(
        self, dtype: torch.dtype, base: torch.Tensor | None = None, *, fold_causal: bool = True
    ) -> torch.Tensor | None:
        """One float mask for kernels that take an additive mask: `base` (e.g. M for
        `fusion="add"`) plus the soft bias and -inf at hard-masked keys.

        With `fold_causal` (for kernels that cannot combine a mask with causality) the
        causal keys are in it too and dead rows are set to 0, so the kernel never sees a
        row of -inf; the caller zeroes their output with `zero_dead_rows`. Without it the
        kernel applies causality and handles dead rows itself.
        """
        total = base.to(dtype) if base is not None else None
        if self.bias is not None:
            total = self.bias.to(dtype) if total is None else total + self.bias.to(dtype)
        keep = self.full_keep() if fold_causal else (None if self.keep is None else _as_4d(self.keep))
        if keep is None:
            return total
        if total is None:
            total = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        total = total.masked_fill(~keep, float("-inf"))
        dead = self.dead_rows() if fold_causal else None
        return total if dead is None else total.masked_fill(dead, 0.0)


NO_UPSTREAM_MASK = UpstreamMask(None, None, False)
"""The split of every call with no upstream mask and no causality: it holds no tensor."""


def upstream_mask(call: AttentionCall) -> UpstreamMask:
    """Split the upstream mask and causality of `call` (see the module docstring).

    Built once per call: kept on `call.upstream`, where `dispatch.run` hands it to the backend.
    """
    upstream: UpstreamMask | None = call.upstream
    if upstream is not None:
        return upstream
    upstream = _split(call)
    object.__setattr__(call, "upstream", upstream)
    return upstream


def _split(call: AttentionCall) -> UpstreamMask:
    attn_mask = call.attn_mask
    if attn_mask is None and not call.is_causal:
        return NO_UPSTREAM_MASK
    nq, nk = call.q.shape[-2], call.k.shape[-2]
    if attn_mask is None:
        return UpstreamMask(None, None, True, nq, nk, call.q.device)
    attn_mask = _as_4d(attn_mask)
    if attn_mask.dtype == torch.bool:
        return UpstreamMask(attn_mask, None, call.is_causal, nq, nk, call.q.device)
    hard = torch.isneginf(attn_mask)
    return UpstreamMask(~hard, attn_mask.masked_fill(hard, 0.0), call.is_causal, nq, nk, call.q.device)


def saturating_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, clamped to its finite range when that range is narrower."""
    if tensor.dtype == dtype:
        return tensor
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        info = torch.finfo(dtype)
        tensor = tensor.clamp(info.min, info.max)
    return tensor.to(dtype)


def lcaam_mask(call: AttentionCall, upstream: UpstreamMask, dtype: torch.dtype) -> torch.Tensor:
    """Dense M of `call` in `dtype`, (B, 1, Nq, Nk), with the fusion's neutral value at every
    key hard-masked in every head, so that M there never enters the computation."""
    m = call.dense_mask()
    keep = upstream.full_keep()
    if keep is not None:
        attended = keep.any(dim=-3)
        m = torch.where(attended, m, torch.full((), NEUTRAL[call.fusion], dtype=m.dtype, device=m.device))
    return saturating_cast(m, dtype).unsqueeze(-3)


def zero_dead_rows(out: torch.Tensor, upstream: UpstreamMask) -> torch.Tensor:
    """`out` (B, H, Nq, Dv) with the rows of dead queries set to 0."""
    dead = upstream.dead_rows()
    return out if dead is None else out.masked_fill(dead, 0.0)


def combine(masks: Sequence[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor | None:
    """Upstream masks in `AttentionCall`'s convention (bool: True = may attend; float: added)
    as one mask of that convention: bool masks are and-ed; once a float mask is among them,
    the sum in `dtype`, with -inf where a bool mask hides a key."""
    given = [m for m in masks if m is not None]
    if not given:
        return None
    if all(m.dtype == torch.bool for m in given):
        combined = given[0]
        for mask in given[1:]:
            combined = combined & mask
        return combined
    total: torch.Tensor | None = None
    for mask in given:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        mask = mask.to(dtype)
        total = mask if total is None else total + mask
    return total


def harden(attn_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """A float upstream mask with every entry <= `threshold` made -inf (a hard mask).

    For upstreams that write "masked" as a large finite negative number: BERT's
    `(1 - m) * -10000` (threshold -10000) or `torch.finfo(dtype).min`.
    """
    return attn_mask.masked_fill(attn_mask <= threshold, float("-inf"))


def hidden_keys(call: AttentionCall, upstream: UpstreamMask) -> torch.Tensor | None:
    """bool (B|1, 1, Nk, 1): keys hard-masked for every query and head; None if none can be."""
    keep = upstream.full_keep()
    if keep is None:
        return None
    return ~keep.any(dim=-2, keepdim=True).any(dim=-3, keepdim=True).transpose(-1, -2)


def hide_masked_keys(call: AttentionCall) -> AttentionCall:
    """`call` with the keys no query may attend zeroed in k, v and the key factor of M."""
    hidden = hidden_keys(call, upstream_mask(call))
    if hidden is None:
        return call
    zero = torch.zeros((), dtype=call.k.dtype, device=call.k.device)
    k = torch.where(hidden, zero, call.k)
    v = torch.where(hidden, zero.to(call.v.dtype), call.v)
    mask = call.mask
    if isinstance(mask, LowRankMask):
        mask = LowRankMask(mask.a, torch.where(hidden[:, 0], torch.zeros((), dtype=mask.b.dtype), mask.b))
    return call.derived(k=k, v=v, mask=mask)


def finite_dead_rows(attn_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool (.., Nq, 1): the rows of a float upstream mask whose every entry is at or below
    `threshold`, a large finite negative number (`finfo.min`) that the upstream means as a
    hard mask. Its own softmax gives such a row equal weights on every key."""
    return (attn_mask <= threshold).all(dim=-1, keepdim=True)


def finite_hard_mask(attn_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An upstream mask that writes "masked" as `finfo.min` (transformers, diffusers) in
    `AttentionCall`'s convention, and its dead rows: (the mask with every entry at or below
    half of `finfo.min` made -inf, `finite_dead_rows` of it or None). Bool masks and None
    pass as they are.

    On the CPU outside `torch.compile`, where reading a value costs no device sync, a mask
    that needs no gradient is looked at first: one that hides no key needs no hardening and
    has no dead row, and one that is all zeros is no mask at all (None).
    """
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask, None
    threshold = torch.finfo(attn_mask.dtype).min / 2
    if attn_mask.device.type == "cpu" and not attn_mask.requires_grad and not torch.compiler.is_compiling():
        if not attn_mask.any().item():
            return None, None
        if attn_mask.min().item() > threshold:
            return attn_mask, None
    return harden(attn_mask, threshold), finite_dead_rows(attn_mask, threshold)


def uniform_dead_rows(
    out: torch.Tensor, weights: torch.Tensor | None, v: torch.Tensor, dead: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`out` (B, H, Nq, Dv) and `weights` with the rows `dead` (from `finite_dead_rows`) set to
    what the upstream computes there: the mean of `v` over every key, and weights 1/Nk."""
    mean = v.mean(dim=-2, keepdim=True).to(out.dtype)
    if mean.shape[1] != out.shape[1]:  # grouped heads: each key head serves several query heads
        mean = mean.repeat_interleave(out.shape[1] // mean.shape[1], dim=1)
    out = torch.where(dead, mean, out)
    if weights is not None:
        weights = weights.masked_fill(dead, 1.0 / v.shape[-2])
    return out, weights
