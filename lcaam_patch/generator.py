"""The mask generator F of the paper (eq. 2-4): a Linear-ReLU stack from tokens to mask rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import neutral_bias
from .errors import SequenceTooLongError


class MaskGenerator(nn.Module):
    """Maps tokens X (B, Nq, D) to a mask M (B, Nq, Nk) with Nk <= `max_kv_tokens`.

    `depth` Linear layers with ReLU between them; the last one outputs `max_kv_tokens`
    columns, sliced to the key length of each call. With `init="identity"` the last layer
    starts at weight 0 and a bias whose activation is the fusion's neutral value, so the
    patched attention computes exactly what the original computes.
    """

    def __init__(
        self,
        in_features: int,
        max_kv_tokens: int,
        *,
        depth: int = 1,
        hidden: int | None = None,
        activation: str = "none",
        fusion: str = "mul",
        init: str = "identity",
        site: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden or in_features
        widths = [in_features] + [hidden] * (depth - 1) + [max_kv_tokens]
        self.layers = nn.ModuleList(
            nn.Linear(w_in, w_out, device=device, dtype=dtype)
            for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.activation = activation
        self.fusion = fusion
        self.max_kv_tokens = max_kv_tokens
        self.site = site
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as configured: He init for hidden layers, identity (or PyTorch's
        default) for the last. Call it after `to_empty()` when the model was patched on
        the `meta` device (`lcaam_patch.reset_generators(model)` does every site)."""
        if self.init == "default":
            self.layers[-1].reset_parameters()
        self.reset_hidden_layers()
        if self.init == "identity":
            self.reset_to_identity()

    def reset_hidden_layers(self) -> None:
        """He (Kaiming) init for the layers followed by ReLU, biases at 0.

        PyTorch's default Linear init shrinks the signal by about √3 per ReLU layer, so a
        deep generator (the paper uses depth 16 and 32) would start blind to its input.
        """
        with torch.no_grad():
            for layer in self.layers[:-1]:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.bias.zero_()

    def reset_to_identity(self) -> None:
        """Set the last layer so that M equals the fusion's neutral value everywhere."""
        bias = neutral_bias(self.fusion, self.activation)
        if bias is None:
            raise ValueError(f"activation {self.activation!r} has no identity for {self.fusion!r}")
        last = self.layers[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(bias)

    def forward(self, x: torch.Tensor, num_kv_tokens: int | None = None) -> torch.Tensor:
        """Return M for tokens `x` (..., Nq, D), sliced to `num_kv_tokens` columns."""
        num_kv_tokens = self.max_kv_tokens if num_kv_tokens is None else num_kv_tokens
        if num_kv_tokens > self.max_kv_tokens:
            raise SequenceTooLongError(
                f"the attention at {self.site or 'this site'!r} got {num_kv_tokens} key tokens "
                f"but its LCAAM generator outputs at most {self.max_kv_tokens}; pass "
                f"max_kv_tokens={num_kv_tokens} (max_tokens for self-attention) or larger "
                f"to lcaam_patch.apply"
            )
        h = x
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        last = self.layers[-1]
        if num_kv_tokens < self.max_kv_tokens:
            m = F.linear(h, last.weight[:num_kv_tokens], last.bias[:num_kv_tokens])
        else:
            m = last(h)
        if self.activation == "sigmoid":
            m = torch.sigmoid(m)
        elif self.activation == "softplus":
            m = F.softplus(m)
        return m

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, fusion={self.fusion!r}"
