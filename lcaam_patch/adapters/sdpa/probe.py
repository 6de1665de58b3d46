"""What the SDPA calls of a model look like: one forward on `meta`, with every
`F.scaled_dot_product_attention` call attributed to the innermost module running it.

With the user's `example_inputs` the whole model runs once; without them each candidate
module (attention-like by its class name, or naming SDPA in its forward) runs alone on a
made-up input (2, 7, C), C read off its first Linear or LayerNorm, which shows how it calls
SDPA but not how many tokens the model feeds it. Results are cached per model.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...probe import forward_on_meta, given_inputs, on_meta
from ...site import GENERATOR_NAME

SDPA = F.scaled_dot_product_attention
"""`F.scaled_dot_product_attention`, which is `torch._C._nn.scaled_dot_product_attention`."""

MADE_UP_TOKENS = 7
"""The token count of the made-up input of a module probed on its own."""

Shape = tuple[int, ...]
Key = int | str
"""A forward argument: its position, or its keyword."""


@dataclasses.dataclass
class Forward:
    """One forward of one module during the probe.

    Attributes:
        inputs: the shapes of its tensor arguments, by position or keyword.
        calls: (q, k) shapes of each SDPA call its own code made (not its children's).
    """

    inputs: dict[Key, Shape]
    calls: list[tuple[Shape, Shape]] = dataclasses.field(default_factory=list)

    @property
    def x_key(self) -> Key | None:
        """The argument LCAAM reads as the query tokens: the first tensor argument."""
        return next(iter(self.inputs), None)


@dataclasses.dataclass
class Record:
    """What the probe saw of one module: its forwards, and whether it came from the
    user's example inputs (whose token counts are real) or a made-up input."""

    forwards: list[Forward]
    real_tokens: bool


@dataclasses.dataclass
class Probe:
    """Records by module path, and why candidates probed on their own could not run."""

    records: dict[str, Record]
    failures: dict[str, str]


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Probe]] = weakref.WeakKeyDictionary()


class _Recorder(TorchFunctionMode):
    """Attributes each SDPA call to the innermost module running."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[Forward] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is SDPA and self.stack:
            query, key = _argument(args, kwargs, 0, "query"), _argument(args, kwargs, 1, "key")
            if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor):
                self.stack[-1].calls.append((tuple(query.shape), tuple(key.shape)))
        return func(*args, **kwargs)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def probe(root: nn.Module) -> Probe:
    """The SDPA calls of `root`'s modules (cached until its modules or the example inputs change)."""
    given = given_inputs()
    key = (tuple(id(m) for m in root.modules()), id(given[0]) if given else None, id(given[1]) if given else None)
    cached = _CACHE.get(root)
    if cached is None or cached[0] != key:
        cached = (key, _probe_with(root, given) if given is not None else _probe_alone(root))
        _CACHE[root] = cached
    return cached[1]


def _probe_with(root: nn.Module, given: tuple[tuple[Any, ...], dict[str, Any]]) -> Probe:
    args, kwargs = on_meta(given)
    records: dict[str, Record] = {}
    try:
        _run(root, lambda dtype: (args, kwargs), records, real=True)
    except Exception as error:
        return Probe({}, {"": f"the model did not run on meta with example_inputs ({type(error).__name__}: {error})"})
    return Probe(records, {})


def _probe_alone(root: nn.Module) -> Probe:
    records: dict[str, Record] = {}
    failures: dict[str, str] = {}
    for prefix, model, size in _image_models(root):
        found: dict[str, Record] = {}
        try:
            _run(model, _images(size), found, real=True)
        except Exception:
            continue
        records.update({_join(prefix, path): record for path, record in found.items()})
    for path, module in root.named_modules():
        if path in records or not candidate(module) or GENERATOR_NAME in path.split("."):
            continue
        width = made_up_width(module)
        if width is None:
            failures[path] = "no Linear or LayerNorm gives the width of its input; pass example_inputs=(...)"
            continue
        found = {}
        error: Exception | None = None
        for make in _made_up(module, width):
            try:
                _run(module, make, found, real=False)
                break
            except Exception as failure:
                found, error = {}, error or failure
        if "" in found:
            records[path] = found[""]
        elif error is not None:
            failures[path] = (
                f"it did not run alone on a made-up input (2, {MADE_UP_TOKENS}, {width}) "
                f"({type(error).__name__}: {error}); pass example_inputs=(...) to apply"
            )
    return Probe(records, failures)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _image_models(root: nn.Module) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The outermost modules that declare their input size as timm does
    (`pretrained_cfg["input_size"]`, (C, H, W)): they are probed on an image of that size."""
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for path, module in root.named_modules():
        config = getattr(module, "pretrained_cfg", None)
        size = config.get("input_size") if isinstance(config, dict) else None
        inside = any(path.startswith(f"{p}.") or not p for p, _, _ in found)
        if not inside and isinstance(size, (tuple, list)) and len(size) == 3:
            found.append((path, module, tuple(int(s) for s in size)))
    return found


def _images(size: tuple[int, ...]) -> Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]:
    def make(dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.empty(1, *size, dtype=dtype),), {}

    return make


def candidate(module: nn.Module) -> bool:
    """Whether a module is probed on its own: its class name says attention, or its forward
    names SDPA."""
    name = type(module).__name__.lower()
    if "attention" in name or "attn" in name:
        return True
    try:
        return "scaled_dot_product_attention" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def made_up_width(module: nn.Module) -> int | None:
    """The width C of a module's input, read off its first Linear (in_features) or LayerNorm."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            return child.in_features
        if isinstance(child, nn.LayerNorm):
            return int(child.normalized_shape[-1])
    return None


CONTEXT_ARGUMENTS = ("encoder_hidden_states", "context", "key_value_states", "memory")
"""Keyword arguments that, by convention, carry the key tokens of cross-attention."""

MADE_UP_KEYS = 11
"""The key count of a made-up cross-attention input (not `MADE_UP_TOKENS`, so it shows)."""


def _made_up(module: nn.Module, width: int) -> list[Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """The made-up inputs tried in turn: X (2, 7, C) alone; then, for a forward that takes
    one of `CONTEXT_ARGUMENTS`, with key tokens (2, 11, C') too, C' the first other width
    its Linears read (C when there is none)."""
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    context = next((name for name in CONTEXT_ARGUMENTS if name in parameters), None)
    widths = [m.in_features for m in module.modules() if isinstance(m, nn.Linear)]
    key_width = next((w for w in widths if w != width), width)

    def alone(dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.empty(2, MADE_UP_TOKENS, width, dtype=dtype),), {}

    def with_context(dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert context is not None
        return alone(dtype)[0], {context: torch.empty(2, MADE_UP_KEYS, key_width, dtype=dtype)}

    return [alone] if context is None else [alone, with_context]


def _run(
    model: nn.Module,
    make: Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]],
    records: dict[str, Record],
    *,
    real: bool,
) -> None:
    recorder = _Recorder()

    def enter(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs: dict[Key, Shape] = {i: tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
            inputs.update({k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            forward = Forward(inputs)
            records.setdefault(path, Record([], real)).forwards.append(forward)
            recorder.stack.append(forward)

        return hook

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        recorder.stack.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with recorder:
            forward_on_meta(model, make)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
