"""C++ for the CPU decode step, built at first use through Inductor's C++ toolchain.

Inductor's `CppPythonBindingsCodeCache` compiles a C++ source with the compiler command and
flags it uses for its own kernels (its OpenMP, so one thread pool serves both), keeps the
library in its on-disk cache and binds one `extern "C" void kernel(...)` function to Python:
tensors are passed as pointers to their data, integers as int64_t, floats as float. Where a
source cannot be built (no compiler, or one without what the source needs) `build` returns
None after one warning, and the caller keeps its torch path.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()


@functools.cache
def build(name: str, argtypes: tuple[str, ...], source: str) -> Callable[..., None] | None:
    """The bound `kernel` of `source` (argtypes: its parameters' C types), built once per
    process; None where it does not build. `name` labels the warning."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    with _lock:
        try:
            return CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)
        except Exception as e:  # no compiler, or one too old for the source
            log.warning("%s off, the torch path instead: %s", name, e)
            return None
