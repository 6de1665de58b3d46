"""Which transformers classes LCAAM claims: the attention interface, or BERT's eager
self-attention written in the forward, read from the class source."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

from torch import nn

CROSS_NAMES = ("cross", "encoder_attn", "encdecattention")


def transformers_loaded() -> bool:
    """Whether transformers has been imported (the adapter never imports it itself)."""
    return "transformers" in sys.modules


_SOURCES: dict[type[nn.Module], str] = {}
_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def forward_source(cls: type[nn.Module]) -> str:
    """The source of `cls.forward` (cached per class; '' when it has none)."""
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _SOURCES[cls] = ""
    return _SOURCES[cls]


def forward_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    """The parameter names of `cls.forward`, self first (cached per class)."""
    if cls not in _PARAMETERS:
        try:
            _PARAMETERS[cls] = tuple(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):
            _PARAMETERS[cls] = ()
    return _PARAMETERS[cls]


def is_config(value: object) -> bool:
    """Whether `value` is a transformers model config."""
    configuration = sys.modules.get("transformers.configuration_utils")
    base = getattr(configuration, "PreTrainedConfig", None) or getattr(configuration, "PretrainedConfig", None)
    return isinstance(base, type) and isinstance(value, base)


def dispatches_through_interface(cls: type) -> bool:
    """Whether `cls.forward` picks its attention function from `ALL_ATTENTION_FUNCTIONS`
    by `self.config._attn_implementation`."""
    source = forward_source(cls)
    return "ALL_ATTENTION_FUNCTIONS" in source and "config._attn_implementation" in source


def model_implementation(module: nn.Module) -> str:
    """The model-level attention implementation the module's config names."""
    config: Any = module.config
    return str(config._attn_implementation)


def is_cross(module: nn.Module, path: str) -> bool:
    """Whether the module at `path` is a cross-attention (by flag, class name or path)."""
    name = path.rsplit(".", 1)[-1].lower()
    return (
        bool(getattr(module, "is_cross_attention", False))
        or "cross" in type(module).__name__.lower()
        or any(part in name for part in CROSS_NAMES)
    )


def config_flag(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of `names` set (truthy) on the module or its config, or None."""
    for name in names:
        for owner in (module, module.config):
            if getattr(owner, name, None) not in (None, False, 0):
                return name
    return None


def is_pretrained_model(module: nn.Module) -> bool:
    """Whether `module` is a transformers `PreTrainedModel`."""
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(module, base)


_BRANCH = re.compile(r"_attn_implementation\s*(?:(==|!=)\s*[\"'](\w+)[\"']|(not\s+in|in)\s*[\(\[]([^\)\]]*)[\)\]])")
_CLASS_SOURCES: dict[type, str] = {}


def implementation_branches(cls: type[nn.Module]) -> tuple[tuple[str, frozenset[str]], ...]:
    """The implementation names `cls`'s own code branches on, besides picking its attention
    function: ("==" | "in", names) for each `config._attn_implementation == "x"` or
    `... in ("x", "y")` in the class source, skipping the `!= "eager"` that chooses between
    eager and `ALL_ATTENTION_FUNCTIONS` (transformers 4.x)."""
    if cls not in _CLASS_SOURCES:
        try:
            _CLASS_SOURCES[cls] = inspect.getsource(cls)
        except (OSError, TypeError):
            _CLASS_SOURCES[cls] = ""
    source = _CLASS_SOURCES[cls]
    found: list[tuple[str, frozenset[str]]] = []
    for match in _BRANCH.finditer(source):
        operator, name, _, names = match.groups()
        if operator is not None:
            following = source[match.end() : match.end() + 400]
            if operator == "!=" and name == "eager" and "ALL_ATTENTION_FUNCTIONS[" in following:
                continue
            found.append(("==", frozenset({name})))
        else:
            found.append(("in", frozenset(re.findall(r"[\"'](\w+)[\"']", names))))
    return tuple(found)


_LEGACY_PARAMETERS = frozenset(
    {
        "hidden_states",
        "attention_mask",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "cache",
        "past_key_values",
        "past_key_value",
        "output_attentions",
        "kwargs",
    }
)
"""Forward parameters this adapter reads; a class with any other is not claimed."""

_REQUIRED = (
    "torch.matmul(query_layer, key_layer.transpose(-1, -2))",
    "/ math.sqrt(self.attention_head_size)",
    "softmax",
    "torch.matmul(attention_probs",
)
_FOREIGN = re.compile(
    r"relative|rotary|rotate|sinusoidal|position|head_mask|bias|distance|local|conv|torch\.cat|\.std\(|scores\s*\*"
)
"""Score terms or outputs this adapter does not reproduce (relative positions, rotary embeddings,
head masks, biases, ConvBERT's convolution joined to the context, ...); their presence in the
forward means the class is not claimed."""

_PAIR = re.compile(r"return\s+context_layer\s*,\s*attention_probs\s*$", re.MULTILINE)
_OPTIONAL = re.compile(
    r"outputs\s*=\s*\(context_layer,\s*attention_probs\)\s*if\s+output_attentions\s+else\s+\(context_layer,\)"
    r"(?:\s*if\s+self\.is_decoder:\s*outputs\s*=\s*outputs\s*\+\s*\(cache,\))?\s*return\s+outputs\s*$"
)
_PLAIN = re.compile(r"return\s+context_layer\s*$")


def return_form(cls: type) -> str | None:
    """How `cls.forward` returns: "pair" (context, weights), "optional" ((context,) or
    (context, weights) by `output_attentions`), "plain" (the context); None if unrecognised."""
    source = forward_source(cls).rstrip()
    for form, pattern in (("pair", _PAIR), ("optional", _OPTIONAL), ("plain", _PLAIN)):
        if pattern.search(source):
            return form
    return None


def is_legacy_self_attention(cls: type) -> bool:
    """Whether `cls` is a transformers module whose forward computes BERT's eager attention
    itself, in the shape this adapter reproduces."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("transformers.models.")):
        return False
    source = forward_source(cls)
    parameters = forward_parameters(cls)
    return (
        len(parameters) > 1
        and parameters[1] == "hidden_states"
        and set(parameters[1:]) <= _LEGACY_PARAMETERS
        and "attention_mask" in parameters
        and all(term in source.replace("nn.Softmax", "softmax") for term in _REQUIRED)
        and "ALL_ATTENTION_FUNCTIONS" not in source
        and not _FOREIGN.search(source)
        and return_form(cls) is not None
    )
