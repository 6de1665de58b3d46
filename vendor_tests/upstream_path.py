"""Import an upstream checkout (a submodule under integration/) for the length of a block."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Iterator
from pathlib import Path


@contextlib.contextmanager
def imports_from(root: Path, packages: Collection[str]) -> Iterator[None]:
    """Put `root` first on sys.path; afterwards forget the modules of `packages` it imported.

    Bytecode is not written, so the submodule's work tree stays clean.
    """
    before = set(sys.modules)
    saved_path, saved_flag = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(root))
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_flag
        for name in set(sys.modules) - before:
            if name.split(".")[0] in packages:
                del sys.modules[name]
