"""Launching numba's parallel kernels from several Python threads.

The passes over the vocabulary (the grammar's scan and marginals, the engine's fused
sampler) are numba kernels over independent rows, run on numba's thread pool. Two of
numba's threading layers, TBB and OpenMP, take launches from any number of Python threads
at once. The third, ``workqueue`` (numba's fallback where neither library is installed,
as on a stock macOS), aborts the process when a second thread launches while one kernel
runs. :func:`parallel_launch` serialises the launches there and costs nothing elsewhere,
so that agents running in threads never bring the process down; every parallel kernel
of the package is compiled by :func:`parallel_kernel`, which launches it so.

>>> @parallel_kernel(cache=False)
... def total(x):
...     s = 0.0
...     for i in nb.prange(x.shape[0]):
...         s += x[i]
...     return s
>>> import numpy as np
>>> float(total(np.ones(4)))
4.0
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba as nb

_launch_lock = threading.Lock()
#: threading layers that take concurrent launches (numba's docs: "threadsafe")
_THREADSAFE_LAYERS = frozenset({"tbb", "omp"})


def _layer() -> str | None:
    try:
        return str(nb.threading_layer())
    except ValueError:  # no parallel kernel has run yet: the first launch picks the layer
        return None


@contextmanager
def parallel_launch() -> Iterator[None]:
    """Hold this around a call of a ``parallel=True`` kernel."""
    if _layer() in _THREADSAFE_LAYERS:
        yield
        return
    with _launch_lock:
        yield


def parallel_kernel(**options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``numba.njit(parallel=True, **options)``, called from Python through
    :func:`parallel_launch`. The kernel is for Python callers only (numba code cannot
    call the wrapper); the compiled dispatcher is its ``kernel`` attribute."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        kernel = nb.njit(parallel=True, **options)(fn)

        @functools.wraps(fn)
        def launch(*args: Any) -> Any:
            with parallel_launch():
                return kernel(*args)

        launch.kernel = kernel  # type: ignore[attr-defined]
        return launch

    return decorate


def serial_and_threaded(kernel_of: Callable[[Any], Callable[..., Any]], **options: Any
                        ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A kernel compiled twice, from ``kernel_of(range)`` and ``kernel_of(numba.prange)``:
    (one-thread, threaded). A caller picks the first where there is one thread, or too
    little work a call to share out: each of the second's parallel loops costs ~1 us to
    start even on one thread. They are two closures, not one function compiled two ways:
    numba's cache keys machine code by source and closure, not by ``parallel``, and one
    function would get the one-thread code for both."""
    return nb.njit(**options)(kernel_of(range)), parallel_kernel(**options)(kernel_of(nb.prange))


def row_parts(rows: int) -> int:
    """How many shares a kernel over ``rows`` independent rows splits them into: one per
    numba thread (``numba.set_num_threads``), a block of rows each, so that each thread
    allocates its buffers once."""
    return max(1, min(rows, nb.get_num_threads()))
