"""Claimed means verified: a site whose adapter infers its claim checks itself at its first call.

An adapter that decides from source text or shapes that it understands a module (the
transformers adapter, which claims every class whose source dispatches through the
attention interface) may meet a class it does not understand. Such adapters set
`Adapter.verifies_claims`; each of their sites then checks, once, at its first call:

1. with M at the fusion's neutral value (what an identity-initialised generator outputs),
   LCAAM computes the upstream's own result for that call, within `tolerance(dtype)`;
2. the result depends on M: a perturbed M on the same inputs changes it (checked where
   some query attends two keys or more whose scores M can move; with one key softmax leaves
   nothing to change, and under `mul` a score of 0 stays 0).

A site that fails raises `UnsupportedModuleError` naming the class and what differed. The
cost is a few extra attention computations per site, once; `apply(..., verify=False)`
turns it off. Calls traced by `torch.compile` or on the `meta` device are not checked (the
site checks at its first eager call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backends import NEUTRAL, AttentionCall, masking
from .errors import UnsupportedModuleError
from .site import LCAAMSite

_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference, relative to the reference's largest magnitude (at least 1), that
    still counts as the same result in `dtype`."""
    return _TOLERANCES.get(dtype, 3e-2)


def needs_verification(site: LCAAMSite, sample: torch.Tensor) -> bool:
    """Whether `site` should check this call: it was not checked yet, the option is on, and
    the call runs eagerly on real tensors."""
    if site.verified or (site.config is not None and not site.config.verify):
        return False
    return not torch.compiler.is_compiling() and not sample.is_meta


def verify_first_call(
    site: LCAAMSite,
    what: str,
    *,
    compute: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[], torch.Tensor],
    mask_shape: tuple[int, int, int],
    attended: torch.Tensor | None,
) -> None:
    """Check one call of `site` and mark it verified, or raise `UnsupportedModuleError`.

    Args:
        site: the site being checked.
        what: the module's class name, for the message.
        compute: the adapter's attention for this call with a given dense M (B, Nq, Nk),
            returning its output in the upstream's layout, without dropout.
        reference: the upstream's own attention for this call, same layout, no dropout.
        mask_shape: (B, Nq, Nk) of M.
        attended: bool, broadcastable to (B, H, Nq, Nk): the keys each query attends where
            M can change the score (under `mul`, not where QKᵀ is 0); None for every key.
    """
    with torch.no_grad():
        expected = reference()
        device, dtype = expected.device, torch.float32
        identity = torch.full(mask_shape, NEUTRAL[site.fusion], device=device, dtype=dtype)
        at_identity = compute(identity)
        allowed = tolerance(expected.dtype) * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
        difference = _max_difference(at_identity, expected)
        if not difference <= allowed:
            raise UnsupportedModuleError(
                f"{what} at {site.path!r}: with LCAAM at identity its attention computes something "
                f"other than the upstream's own attention for the same call (largest difference "
                f"{difference:.3g}, allowed {allowed:.3g}), so the patch would change the model. "
                f"Exclude it with exclude=[{site.path!r}] and report the class to lcaam-patch; "
                f"verify=False skips this check"
            )
        noise = torch.rand(mask_shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
        # large and of both signs, so that it shows even on the small scores of a fresh model in bf16
        perturbed = identity + (noise - 0.5) * (200.0 if site.fusion == "mul" else 40.0)
        changed = _max_difference(compute(perturbed), at_identity) > 0.0
        if not changed and _some_query_attends_two_keys(attended, mask_shape):
            raise UnsupportedModuleError(
                f"{what} at {site.path!r}: its attention output does not change when LCAAM's mask "
                f"does, so LCAAM would not be in the path. Exclude it with exclude=[{site.path!r}] "
                f"and report the class to lcaam-patch; verify=False skips this check"
            )
    site.verified = True


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    both_nan = a.isnan() & b.isnan()
    difference = (a.double() - b.double()).abs().nan_to_num(nan=float("inf"))
    return float(difference.masked_fill(both_nan, 0.0).max())


def _some_query_attends_two_keys(attended: torch.Tensor | None, mask_shape: tuple[int, int, int]) -> bool:
    if attended is None:
        return mask_shape[-1] >= 2
    return bool((attended.sum(dim=-1) >= 2).any())


def attended_keys(call: AttentionCall, fusion: str) -> torch.Tensor | None:
    """The keys each query of `call` attends where M can move the score, for
    `verify_first_call`'s `attended`: those the upstream mask keeps and, under `mul`, not
    where QKᵀ is 0 (keys still at zero init); None for every key."""
    attended = masking.upstream_mask(call).full_keep()
    if fusion == "mul":
        moves = (call.q @ call.with_repeated_heads().k.transpose(-2, -1)) != 0
        attended = moves if attended is None else attended & moves
    return attended
