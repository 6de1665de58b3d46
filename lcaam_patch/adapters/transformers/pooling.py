"""`nn.MultiheadAttention` pooling heads inside transformers image models (SigLIP's
`SiglipMultiheadAttentionPoolingHead` and the models that embed a SigLIP tower): a learnt
probe query attends the image's tokens. The module itself does not know how many tokens it
sees, so the plain `nn.MultiheadAttention` adapter needs `max_tokens`; here the bounds are
read off the shape probe of the enclosing image model (`probe.probed_tokens`), i.e. what
the model really feeds the head at its configured image size. The computation is
`nn.MultiheadAttention`'s own, from the `torch_mha` adapter; a longer call than the probe
saw (a larger image than configured) is refused at that call with `SequenceTooLongError`,
and `max_tokens` / `max_kv_tokens` given to `apply` take precedence over the probe.

It does not set `verifies_claims`: what it claims is a class, not an inference from source
text, and what it computes is `nn.MultiheadAttention`'s own forward (the `torch_mha`
adapter's, tested exact against it); only the bounds are inferred, and a wrong bound cannot
make it silently wrong: a bound above what the head sees leaves generator columns unused,
one below it is refused at the call (`SequenceTooLongError`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...config import LCAAMConfig
from ...site import SiteGeometry
from ..torch_mha import MultiheadAttentionAdapter
from .discovery import transformers_loaded
from .probe import image_model_on_path, probed_tokens


class PoolingHeadAdapter(MultiheadAttentionAdapter):
    """Patches the `nn.MultiheadAttention`s of transformers image models, with probed bounds."""

    name = "transformers_pooling_head"
    priority = 10

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """An `nn.MultiheadAttention` on the path of a transformers model whose input is
        `pixel_values` (the outermost such model is the one probed)."""
        return type(module) is nn.MultiheadAttention and transformers_loaded() and image_model_on_path(root, path)

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """`nn.MultiheadAttention`'s geometry with the bounds the probe saw, unless given."""
        if config.max_tokens is None and config.max_kv_tokens is None:
            probed = probed_tokens(module, path, root)
            if probed is not None and min(probed) > 0:
                config = dataclasses.replace(config, max_tokens=probed[0], max_kv_tokens=probed[1])
        return super().geometry(module, path, root, config)


adapter = PoolingHeadAdapter()
