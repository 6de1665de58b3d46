"""Which transformers classes LCAAM claims: the attention interface, or BERT's eager
self-attention written in the forward, read from the class source."""

from __future__ import annotations

import dataclasses
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
        "key_value_states",
        "cache",
        "past_key_values",
        "past_key_value",
        "output_attentions",
        "kwargs",
    }
)
"""Forward parameters `transformers_legacy` reads; a class with any other is not claimed
(except the `PREFIX_KEY_PARAMETERS`)."""

PREFIX_KEY_PARAMETERS = {"attn_prompt": "use_prompt"}
"""Forward parameters that put keys of no token before the call's own (MVP's prompts), with
the attribute that makes a module above the attention pass them: a class taking one is
claimed without the `if <parameter> is not None:` block, and refused at apply where a module
on its path has that attribute set, and at a call given one."""

_FOREIGN = re.compile(
    r"relative|rotary|rotate|sinusoidal|position|head_mask|bias|distance|local|conv|torch\.cat|\.std\(|scores\s*\*"
)
"""Score terms or outputs `transformers_legacy` does not reproduce (relative positions, rotary
embeddings, head masks, biases, ConvBERT's convolution joined to the context, ...); their
presence in the forward means the class is not claimed."""


@dataclasses.dataclass(frozen=True)
class LegacyForm:
    """One shape of eager attention written in the module's forward that `transformers_legacy`
    reproduces: the module's Linears and head attributes, the source terms that compute it,
    and how the forward returns.

    Attributes:
        name: "bert" or "bart".
        projections: the query, key and value Linears' attribute names.
        output: the output projection's attribute name, None when the context is returned.
        heads, head_width: the int attributes with the head count and width.
        required: patterns the forward's source must all match.
        returns: (return form, pattern) in the order tried; see `return_form`.
        weights_before_dropout: whether returned weights are those before attention dropout.
    """

    name: str
    projections: tuple[str, str, str]
    output: str | None
    heads: str
    head_width: str
    required: tuple[re.Pattern[str], ...]
    returns: tuple[tuple[str, re.Pattern[str]], ...]
    weights_before_dropout: bool

    def scale(self, module: nn.Module) -> float:
        """The factor of QKᵀ: 1/√d (BERT), or the module's `scaling`/`scale` its forward reads."""
        pattern = self.required[0]
        found = pattern.search(forward_source(type(module))) if "scale" in pattern.groupindex else None
        if found is None:
            return float(getattr(module, self.head_width)) ** -0.5
        return float(getattr(module, found.group("scale")))


def _literal(text: str) -> re.Pattern[str]:
    return re.compile(re.escape(text))


BERT_FORM = LegacyForm(
    name="bert",
    projections=("query", "key", "value"),
    output=None,
    heads="num_attention_heads",
    head_width="attention_head_size",
    required=(
        _literal("/ math.sqrt(self.attention_head_size)"),
        _literal("torch.matmul(query_layer, key_layer.transpose(-1, -2))"),
        _literal("softmax"),
        _literal("torch.matmul(attention_probs"),
    ),
    returns=(
        ("pair", re.compile(r"return\s+context_layer\s*,\s*attention_probs\s*$", re.MULTILINE)),
        (
            "optional",
            re.compile(
                r"outputs\s*=\s*\(context_layer,\s*attention_probs\)\s*if\s+output_attentions\s+else\s+"
                r"\(context_layer,\)(?:\s*if\s+self\.is_decoder:\s*outputs\s*=\s*outputs\s*\+\s*\(cache,\))?"
                r"\s*return\s+outputs\s*$"
            ),
        ),
        ("plain", re.compile(r"return\s+context_layer\s*$")),
    ),
    weights_before_dropout=False,
)
"""BERT's self-attention: `query`/`key`/`value` Linears, QKᵀ/√d plus the mask, softmax,
dropout, times V; returns the context (and the weights after dropout)."""

BART_FORM = LegacyForm(
    name="bart",
    projections=("q_proj", "k_proj", "v_proj"),
    output="out_proj",
    heads="num_heads",
    head_width="head_dim",
    required=(
        re.compile(r"self\.q_proj\(hidden_states\)\s*\*\s*self\.(?P<scale>scaling|scale)\b"),
        _literal("torch.bmm(query_states, key_states.transpose(1, 2))"),
        re.compile(r"attn_weights\.view\(bsz, self\.num_heads, tgt_len, src_len\)\s*\+\s*attention_mask\b"),
        _literal("softmax(attn_weights, dim=-1"),
        _literal("nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)"),
        _literal("torch.bmm(attn_probs, value_states)"),
        _literal("self.out_proj(attn_output)"),
    ),
    returns=(
        (
            "pair_if_asked",
            re.compile(
                r"if\s+output_attentions:.*else:\s*attn_weights_reshaped\s*=\s*None.*"
                r"return\s+attn_output\s*,\s*attn_weights_reshaped\s*$",
                re.DOTALL,
            ),
        ),
        ("pair", re.compile(r"return\s+attn_output\s*,\s*attn_weights_reshaped\s*$")),
    ),
    weights_before_dropout=True,
)
"""The older BART/CLIP attention written with `torch.bmm` (XGLM, TrOCR, GroupViT, MVP):
`q_proj`/`k_proj`/`v_proj`/`out_proj` Linears, queries times `scaling` (or `scale`), plus
the (B, 1, Nq, Nk) additive mask, softmax, dropout, times V, `out_proj`; returns the output
and the weights before dropout (always, or when `output_attentions`)."""

LEGACY_FORMS = (BERT_FORM, BART_FORM)


def return_form(cls: type) -> str | None:
    """How `cls.forward` returns: "pair" (output, weights), "pair_if_asked" (output, weights
    when `output_attentions` else None), "optional" ((output,) or (output, weights) by
    `output_attentions`), "plain" (the output); None if unrecognised."""
    form = legacy_form(cls)
    return None if form is None else _return_form(form, forward_source(cls))


def _return_form(form: LegacyForm, source: str) -> str | None:
    source = source.rstrip()
    return next((name for name, pattern in form.returns if pattern.search(source)), None)


def _without_prefix_blocks(source: str) -> str:
    """`source` less the `if <parameter> is not None:` blocks of the `PREFIX_KEY_PARAMETERS`."""
    lines = source.splitlines()
    kept: list[str] = []
    block_indent: int | None = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            continue
        block_indent = None
        if any(line.strip() == f"if {name} is not None:" for name in PREFIX_KEY_PARAMETERS):
            block_indent = indent
            continue
        kept.append(line)
    return "\n".join(kept)


_FORMS: dict[type, LegacyForm | None] = {}


def legacy_form(cls: type) -> LegacyForm | None:
    """The `LegacyForm` of a transformers module class whose forward computes that eager
    attention itself, and nothing this adapter does not reproduce; None otherwise."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("transformers.models.")):
        return None
    if cls not in _FORMS:
        _FORMS[cls] = next((form for form in LEGACY_FORMS if _has_form(cls, form)), None)
    return _FORMS[cls]


def _has_form(cls: type[nn.Module], form: LegacyForm) -> bool:
    source = forward_source(cls)
    parameters = forward_parameters(cls)
    readable = _without_prefix_blocks(source).replace("nn.Softmax", "softmax")
    return (
        len(parameters) > 1
        and parameters[1] == "hidden_states"
        and set(parameters[1:]) <= _LEGACY_PARAMETERS | PREFIX_KEY_PARAMETERS.keys()
        and "attention_mask" in parameters
        and all(pattern.search(readable) for pattern in form.required)
        and "ALL_ATTENTION_FUNCTIONS" not in source
        and not _FOREIGN.search(readable)
        and _return_form(form, source) is not None
    )


def is_legacy_self_attention(cls: type) -> bool:
    """Whether `cls` is a transformers module whose forward computes one of the
    `LEGACY_FORMS` of eager attention itself."""
    return legacy_form(cls) is not None
