"""Compiling agentloop's numba kernels ahead of their first call, in several processes.

The constraint's passes and the grammar compiler are numba kernels, compiled for the
machine's CPU at their first call and kept in numba's disk cache. A fresh install's
first run compiles them one after another: ~40 s of a ~46 s first demo on a 2-core
machine. Their argument types do not depend on the user's tools, model or logits, so
they are recorded once, in the package (``data/kernel_signatures.json``), and compiled
here before they are called: shared out over processes, the longest first, this
process taking one share. The kernels then load from numba's cache as on any later run.
``agentloop precompile`` runs it; ``agentloop demo`` does on a first run.

>>> from agentloop.precompile import missing_kernels, recorded_kernels
>>> kernels = recorded_kernels()
>>> any(k.name == "_write_marginals" for k in kernels)
True
>>> missing = missing_kernels(kernels[:1])   # those numba's cache does not hold yet
>>> len(missing) <= 1
True

``precompile_kernels()`` compiles what ``missing_kernels()`` lists (nothing where the
cache holds it all). Recording again, after a kernel's arguments changed (a test
compares the recording with the kernels the package defines)::

    python -m agentloop.precompile --record
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import KernelCompileError

#: The recorded kernels and their argument types (``--record`` writes it).
SIGNATURES_FILE = Path(__file__).parent / "data" / "kernel_signatures.json"
#: The modules holding the kernels (recording and resolving look at their globals).
KERNEL_MODULES = (
    "agentloop.grammar.canvas", "agentloop.grammar.canvas_layout", "agentloop.grammar.copy",
    "agentloop.grammar.device_passes", "agentloop.grammar.float32_math", "agentloop.grammar.float64_math",
    "agentloop.grammar.fsa", "agentloop.grammar.fused_kernel", "agentloop.grammar.log_canvas",
    "agentloop.grammar.masks", "agentloop.grammar.pruning", "agentloop.grammar.token_automaton",
    "agentloop.grammar.vocabulary", "agentloop.engine.sampling",
)


@dataclass(frozen=True)
class RecordedKernel:
    """A kernel by the module global that holds it (``key``: its index or key where the
    global is a tuple or dict of kernels), the argument types it is called with (see
    ``_numba_type``) and the seconds its compiles took where it was recorded (to share
    the kernels out evenly)."""

    module: str
    name: str
    key: Any
    signatures: tuple[tuple[Any, ...], ...]
    seconds: float
    demo: bool = False  #: whether ``agentloop demo`` calls it

    def dispatcher(self) -> Any:
        """The numba dispatcher (a ``parallel_kernel``'s compiled kernel), or None where
        the global is gone or holds no such kernel."""
        holder = getattr(importlib.import_module(self.module), self.name, None)
        if self.key is not None:
            try:
                holder = holder[self.key]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                return None
        return _as_dispatcher(holder)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "name": self.name, "key": _as_list(self.key), "demo": self.demo,
                "seconds": self.seconds, "signatures": _as_list(self.signatures)}

    @classmethod
    def from_json(cls, k: dict[str, Any]) -> "RecordedKernel":
        return cls(k["module"], k["name"], _as_tuple(k.get("key")), _as_tuple(k["signatures"]), float(k["seconds"]),
                   bool(k.get("demo")))


@dataclass(frozen=True)
class PrecompileReport:
    """What ``precompile_kernels`` did: kernels compiled, processes used, seconds taken."""

    compiled: int
    processes: int
    seconds: float


def recorded_kernels(path: Path | None = None) -> list[RecordedKernel]:
    """The kernels recorded in ``path`` (default ``SIGNATURES_FILE``, the package's)."""
    data = json.loads(Path(path or SIGNATURES_FILE).read_text())
    return [RecordedKernel.from_json(k) for k in data["kernels"]]


def missing_kernels(kernels: Sequence[RecordedKernel] | None = None) -> list[RecordedKernel]:
    """The kernels of ``kernels`` (all recorded ones by default) with a signature that
    numba's disk cache does not hold for this machine (nothing is loaded: the kernels
    load at their first calls, as on any run). A kernel that is no longer
    defined is left out (the recording is older than the code: no harm, it compiles at
    its first call)."""
    missing = []
    for k in recorded_kernels() if kernels is None else kernels:
        d = k.dispatcher()
        if d is None:
            continue
        if any(not _cached(d, sig) for sig in _signatures(k)):
            missing.append(k)
    return missing


def precompile_kernels(kernels: Sequence[RecordedKernel] | None = None, processes: int | None = None
                       ) -> PrecompileReport:
    """Compile ``kernels`` (by default those ``missing_kernels()`` lists) into numba's
    disk cache, shared out over ``processes`` processes (default: one per CPU, at most one
    per kernel), this one among them. Kernels whose machine code shares a cache file
    (closures of one factory, a kernel's signatures) go to one process, so that no two
    write it at once. Raises ``KernelCompileError`` where a process fails; what the
    others compiled stays cached."""
    t0 = time.perf_counter()
    todo = missing_kernels() if kernels is None else list(kernels)
    if not todo:
        return PrecompileReport(0, 0, time.perf_counter() - t0)
    shares = _shares(todo, processes or os.cpu_count() or 1)
    errors: list[str] = []
    with _workers(shares[1:]) as workers:
        try:
            _compile(shares[0])
        except Exception as e:  # (numba's errors: the others' shares still finish)
            errors.append(f"this process: {type(e).__name__}: {e}")
        for i, (w, share) in enumerate(zip(workers, shares[1:]), 1):
            if w.wait() != 0:
                names = ", ".join(k.name for k in share)
                errors.append(f"process {i}, holding {names} (exit status {w.returncode}):\n{w.error_output()}")
    if errors:
        raise KernelCompileError(
            f"compiling kernels failed in {len(errors)} of {len(shares)} process(es); the kernels they held compile "
            f"at their first call instead. The first failure: {errors[0]}")
    return PrecompileReport(len(todo), len(shares), time.perf_counter() - t0)


# ---- inside a process ------------------------------------------------------------------


def _as_dispatcher(holder: Any) -> Any:
    from numba.core.dispatcher import Dispatcher

    holder = getattr(holder, "kernel", holder)  # (numba_threads.parallel_kernel's launcher)
    return holder if isinstance(holder, Dispatcher) else None


def _signatures(k: RecordedKernel) -> list[tuple[Any, ...]]:
    return [tuple(_numba_type(a) for a in sig) for sig in k.signatures]


def _cached(d: Any, sig: tuple[Any, ...]) -> bool:
    """Whether ``d`` holds ``sig`` compiled, or numba's disk cache does for this machine
    (its index names it: what ``Dispatcher.compile`` looks up first). numba has no public
    test for a cached signature: where its cache's internals differ from numba 0.60-0.68's,
    the entry is loaded instead, as a first call would."""
    if sig in d.overloads:
        return True
    cache = getattr(d, "_cache", None)
    if cache is None or not getattr(cache, "_enabled", True):
        return False
    try:
        d.targetctx.refresh()
        key = cache._index_key(sig, d.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except AttributeError:
        pass
    except Exception:  # (an unreadable index: compiling writes a new one)
        return False
    try:
        return cache.load_overload(sig, d.targetctx) is not None
    except Exception:
        return False


def _compile(kernels: Sequence[RecordedKernel]) -> None:
    for k in kernels:
        d = k.dispatcher()
        if d is None:
            continue
        for sig in _signatures(k):
            d.compile(sig)


def _numba_type(spec: Any) -> Any:
    """A numba type from its recorded spec: ``["array", dtype, ndim, layout, readonly]``,
    ``["scalar", dtype]`` or ``["tuple", [spec, ...]]``."""
    import numba as nb
    import numpy as np

    kind = spec[0]
    if kind == "scalar":
        return nb.from_dtype(np.dtype(spec[1]))
    if kind == "array":
        return nb.types.Array(nb.from_dtype(np.dtype(spec[1])), int(spec[2]), spec[3], readonly=bool(spec[4]))
    if kind == "tuple":
        return nb.types.Tuple(tuple(_numba_type(s) for s in spec[1]))
    raise ValueError(f"unknown kind of recorded argument type {spec!r} in {SIGNATURES_FILE.name}")


def _type_spec(t: Any) -> Any:
    """The spec ``_numba_type`` reads back, or None for a type it does not handle."""
    import numba as nb

    if isinstance(t, nb.types.Array):
        dtype = _numpy_name(t.dtype)
        return None if dtype is None else ["array", dtype, t.ndim, t.layout, not t.mutable]
    if isinstance(t, nb.types.BaseTuple):
        parts = [_type_spec(s) for s in t.types]
        return None if any(p is None for p in parts) else ["tuple", parts]
    dtype = _numpy_name(t)
    return None if dtype is None else ["scalar", dtype]


def _numpy_name(t: Any) -> str | None:
    import numba as nb

    try:
        return str(nb.np.numpy_support.as_dtype(t))
    except (NotImplementedError, TypeError):
        return None


def _as_tuple(spec: Any) -> Any:
    """JSON's lists back to tuples (specs and keys are compared and hashed)."""
    return tuple(_as_tuple(s) for s in spec) if isinstance(spec, list) else spec


def _as_list(value: Any) -> Any:
    """Tuples to JSON's lists, nested."""
    return [_as_list(v) for v in value] if isinstance(value, tuple) else value


# ---- sharing out -----------------------------------------------------------------------


def _cache_file_key(k: RecordedKernel) -> tuple[str, str, int]:
    """Kernels that numba caches in one index file: the same function's source (closures
    of one factory are keyed by their cells inside the file)."""
    d = k.dispatcher()
    f = getattr(d, "py_func", None)
    if f is None:
        return (k.module, k.name, -1)
    return (f.__module__, f.__qualname__, f.__code__.co_firstlineno)


def _shares(kernels: Sequence[RecordedKernel], processes: int) -> list[list[RecordedKernel]]:
    """At most ``processes`` lists, longest-first onto the least loaded; one cache file's
    kernels together. The first share is this process's."""
    groups: dict[tuple[str, str, int], list[RecordedKernel]] = {}
    for k in kernels:
        groups.setdefault(_cache_file_key(k), []).append(k)
    units = sorted(groups.values(), key=lambda g: -sum(k.seconds for k in g))
    n = max(1, min(processes, len(units)))
    shares: list[list[RecordedKernel]] = [[] for _ in range(n)]
    load = [0.0] * n
    for unit in units:
        i = min(range(n), key=lambda j: load[j])
        shares[i].extend(unit)
        # (a process other than this one first imports agentloop: ~2 s)
        load[i] += sum(k.seconds for k in unit) + (0.0 if i == 0 or load[i] else 2.0)
    return [s for s in shares if s] or [[]]


class _Worker:
    """A process compiling one share (``python -m agentloop.precompile --compile``, the
    share's kernels and signatures on its stdin), its error output in a file (a pipe nobody reads while it runs
    could fill up and stall it)."""

    def __init__(self, share: Sequence[RecordedKernel]) -> None:
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "agentloop.precompile", "--compile"],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([k.to_json() for k in share]).encode())
        self.process.stdin.close()

    def wait(self) -> int:
        return self.process.wait()

    def error_output(self, limit: int = 2000) -> str:
        """The end of what the process wrote to stderr (a traceback where it failed)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


@contextlib.contextmanager
def _workers(shares: Sequence[Sequence[RecordedKernel]]) -> Iterator[list[_Worker]]:
    """A worker for each share, killed on the way out where it still runs (an
    interrupted wait: no process is left behind)."""
    workers: list[_Worker] = []
    try:
        for share in shares:
            workers.append(_Worker(share))
        yield workers
    finally:
        for w in workers:
            if w.process.poll() is None:
                w.process.kill()
                w.process.wait()
            w.log.close()


# ---- recording ---------------------------------------------------------------------------


def _record_workload() -> Iterator[str]:
    """What the recording runs, naming each part after it ran: the demo (the engine's loop
    over the demo tools' grammar), then the grammar API's ops, with one numba thread and
    with several (kernels come in one-thread and threaded builds, taken by the thread
    count)."""
    import numba as nb
    import torch
    from click.testing import CliRunner

    from .cli import DEMO_TOOLS, main
    from .grammar import byte_tokenizer, compile_tools

    for threads in sorted({1, nb.config.NUMBA_NUM_THREADS}):
        nb.set_num_threads(threads)
        result = CliRunner().invoke(main, ["demo"])
        if result.exit_code != 0:
            raise RuntimeError(f"the demo failed while recording:\n{result.output}")
    yield "demo"
    for threads in sorted({1, nb.config.NUMBA_NUM_THREADS}):
        nb.set_num_threads(threads)
        g = compile_tools(DEMO_TOOLS, byte_tokenizer(), "gemma4")
        logits = torch.randn(64, g.stats.vocab_size, generator=torch.Generator().manual_seed(0))
        g.viterbi(logits)
        g.sample(logits)
        g.marginals(logits)
        g.marginals(logits[None].expand(2, -1, -1))
    yield "grammar API"


def _recording() -> dict[str, Any]:
    """Runs the workload with a compile clock; -> the file's content."""
    import numba
    from numba.core import event

    by_function: dict[int, float] = {}  # id(dispatcher) -> seconds of its outermost compiles
    starts: list[float] = []

    class Clock(event.Listener):  # (outermost compiles only: nested ones inside their time)
        def on_start(self, ev: Any) -> None:
            starts.append(time.perf_counter())

        def on_end(self, ev: Any) -> None:
            dt = time.perf_counter() - starts.pop()
            if not starts:
                d = ev.data["dispatcher"]
                by_function[id(d)] = by_function.get(id(d), 0.0) + dt

    event.register("numba:compile", Clock())
    demo: set[int] = set()  # the dispatchers the demo compiled
    for part in _record_workload():
        if part == "demo":
            demo = set(by_function)
    kernels = []
    seen: set[int] = set()
    for module in KERNEL_MODULES:
        m = importlib.import_module(module)
        for name, key, holder in _kernel_globals(m):
            d = _as_dispatcher(holder)
            # (kernels called from Python only: one called only from kernels is compiled inside them)
            if d is None or id(d) in seen or d.py_func.__module__ != module or id(d) not in by_function:
                continue
            seen.add(id(d))
            sigs = [[_type_spec(t) for t in sig] for sig in d.signatures]
            sigs = [s for s in sigs if all(t is not None for t in s)]
            if sigs:
                kernels.append({"module": module, "name": name, "key": _as_list(key), "demo": id(d) in demo,
                                "seconds": round(by_function[id(d)], 2), "signatures": sigs})
    return {"numba": numba.__version__, "python": sys.version.split()[0], "kernels": kernels}


def _kernel_globals(m: Any) -> Iterator[tuple[str, Any, Any]]:
    """(name, key, value) of a module's globals, and of the items of its tuples and dicts
    of kernels (key None for a global itself)."""
    for name, value in sorted(vars(m).items()):
        yield name, None, value
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                yield name, i, item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, (str, int, tuple)):
                    yield name, key, item


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentloop.precompile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="compile the kernels given on stdin (a worker)")
    ap.add_argument("--record", action="store_true",
                    help=f"record the kernels' signatures into {SIGNATURES_FILE} (runs the demo, fresh caches)")
    ap.add_argument("--record-here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile:
        _compile([RecordedKernel.from_json(k) for k in json.load(sys.stdin)])
        return 0
    if args.record_here:  # (the recording's own process, its caches fresh)
        json.dump(_recording(), sys.stdout)
        return 0
    if args.record:
        with tempfile.TemporaryDirectory(prefix="agentloop-record-") as tmp:
            env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba"),
                   "AGENTLOOP_CACHE_DIR": str(Path(tmp) / "grammars")}
            out = subprocess.run([sys.executable, "-m", "agentloop.precompile", "--record-here"], env=env,
                                 check=True, capture_output=True, text=True).stdout
        data = json.loads(out)
        SIGNATURES_FILE.write_text(_dumps(data))
        print(f"recorded {len(data['kernels'])} kernels into {SIGNATURES_FILE}")
        return 0
    report = precompile_kernels()
    print(f"compiled {report.compiled} kernels in {report.processes} process(es), {report.seconds:.1f} s")
    return 0


def _dumps(data: dict[str, Any]) -> str:
    """One kernel a line block, one signature a line: diffs of a recording stay readable."""
    lines = ["{", f'  "numba": {json.dumps(data["numba"])},', f'  "python": {json.dumps(data["python"])},',
             '  "kernels": [']
    for i, k in enumerate(data["kernels"]):
        sigs = ",\n".join(f"      {json.dumps(s)}" for s in k["signatures"])
        head = {key: k[key] for key in ("module", "name", "key", "demo", "seconds")}
        lines.append(f"    {json.dumps(head)[:-1]}, \"signatures\": [\n{sigs}\n    ]}}"
                     + ("," if i < len(data["kernels"]) - 1 else ""))
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_main())
