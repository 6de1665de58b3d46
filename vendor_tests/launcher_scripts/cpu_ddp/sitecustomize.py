"""Test shim for two CPU ranks: timm's train.py passes `device_ids=[device]` to
DistributedDataParallel, which PyTorch refuses for a CPU module; this drops CPU
`device_ids`, as a GPU run would not need. Found after lcaam-patch's own sitecustomize,
which runs it (the chaining is part of what the tests check)."""

from __future__ import annotations

from typing import Any

import wrapt


@wrapt.when_imported("torch.nn.parallel.distributed")
def _drop_cpu_device_ids(module: Any) -> None:
    def init(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids = kwargs.get("device_ids")
        if ids and all(getattr(d, "type", d) == "cpu" for d in ids):
            kwargs = {**kwargs, "device_ids": None}
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(module, "DistributedDataParallel.__init__", init)
