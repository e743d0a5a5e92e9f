"""Compiling agentloop's numba kernels ahead of their first call, in several processes.

The constraint's passes and the grammar compiler are numba kernels, compiled for the
machine's CPU at their first call and kept in numba's disk cache. A fresh install's
first run compiles them one after another: ~40 s of a ~48 s first demo on a 2-core
machine. Their argument types do not depend on the user's tools, model or logits, so
they are recorded once, in the package (``data/kernel_signatures.json``), and compiled
here before they are called: shared out over processes, the longest first, this
process taking one share. The kernels then load from numba's cache as on any later run.
``agentloop precompile`` runs it; ``agentloop demo``, ``run`` and ``chat`` do on a first
run (the kernels the agent loop calls, ``RecordedKernel.demo``).

>>> from agentloop.precompile import missing_kernels, recorded_kernels
>>> step = next(k for k in recorded_kernels() if k.name == "_write_marginals")
>>> step.module, step.demo, len(step.signatures)
('agentloop.grammar.canvas', True, 1)
>>> [k.name for k in missing_kernels([step])] in ([], ["_write_marginals"])  # in numba's cache yet?
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
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import KernelCompileError

#: The recorded kernels and their argument types (``--record`` writes it).
SIGNATURES_FILE = Path(__file__).parent / "data" / "kernel_signatures.json"
#: The most processes ``default_processes`` gives.
MAX_PROCESSES = 8
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
    the kernels out evenly). A kernel the demo calls with some signatures and the rest of
    the recorded workload with others is two of these, so that a first run compiles the
    demo's alone."""

    module: str
    name: str
    key: Any
    signatures: tuple[tuple[Any, ...], ...]
    seconds: float
    demo: bool = False  #: whether ``agentloop demo`` calls it with these signatures

    @property
    def identity(self) -> tuple[str, str, str]:
        """(module, name, key) of the kernel: the same for both entries of a split kernel."""
        return self.module, self.name, repr(self.key)

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

    compiled: int  #: kernels (``kernel_count``)
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


def default_processes() -> int:
    """The processes ``precompile_kernels`` shares the kernels over by default: one per
    CPU this process may run on, at most ``MAX_PROCESSES`` (each imports agentloop and
    torch, ~360 MiB; past a few, the longest kernel bounds the time), one where Python is
    embedded in a frozen app (no interpreter to start)."""
    if getattr(sys, "frozen", False):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on macOS and Windows)
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_PROCESSES))


def precompile_kernels(kernels: Sequence[RecordedKernel] | None = None, processes: int | None = None
                       ) -> PrecompileReport:
    """Compile ``kernels`` (by default those ``missing_kernels()`` lists) into numba's
    disk cache, shared out over ``processes`` processes (default ``default_processes()``,
    at most one per kernel), this one among them. Each process saves into numba's cache
    under one lock: numba reads an index, picks a data file and writes both without one,
    and kernels in different processes call the same helpers, which it caches too.

    Raises ``KernelCompileError`` where a process fails (or cannot start); what the
    others compiled stays cached. Interrupted, it kills the processes it started; one
    whose parent dies ends itself (it watches its stdin)."""
    t0 = time.perf_counter()
    todo = missing_kernels() if kernels is None else list(kernels)
    if not todo:
        return PrecompileReport(0, 0, time.perf_counter() - t0)
    shares = _shares(todo, processes or default_processes())
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="agentloop-precompile-") as tmp:
        lock = Path(tmp) / "numba-cache.lock"
        lock.touch()
        with _cache_saves_locked(lock), _workers(shares[1:], lock) as workers:
            try:
                _compile(shares[0])
            except Exception:  # (numba's errors: the others' shares still finish)
                errors.append(f"this process, holding {_names(shares[0])}:\n{traceback.format_exc()[-2000:]}")
            for i, (w, share) in enumerate(zip(workers, shares[1:]), 1):
                if w.wait() != 0:
                    errors.append(f"process {i}, holding {_names(share)} (exit status {w.returncode}):\n"
                                  f"{w.error_output()}")
    if errors:
        raise KernelCompileError(
            f"compiling kernels failed in {len(errors)} of {len(shares)} process(es); the kernels they held compile "
            f"at their first call instead. The first failure: {errors[0]}")
    return PrecompileReport(kernel_count(todo), len(shares), time.perf_counter() - t0)


def kernel_count(kernels: Sequence[RecordedKernel]) -> int:
    """How many kernels ``kernels`` holds (a kernel may be two entries: see ``RecordedKernel``)."""
    return len({k.identity for k in kernels})


def _names(share: Sequence[RecordedKernel]) -> str:
    return ", ".join(k.name for k in share)


# ---- inside a process ------------------------------------------------------------------


def _as_dispatcher(holder: Any) -> Any:
    from numba.core.dispatcher import Dispatcher

    holder = getattr(holder, "kernel", holder)  # (numba_threads.parallel_kernel's launcher)
    return holder if isinstance(holder, Dispatcher) else None


def _caches(d: Any) -> bool:
    """Whether numba keeps ``d``'s machine code in its disk cache (``cache=True``)."""
    from numba.core.caching import NullCache

    return not isinstance(getattr(d, "_cache", None), (NullCache, type(None)))


def _signatures(k: RecordedKernel) -> list[tuple[Any, ...]]:
    return [tuple(_numba_type(a) for a in sig) for sig in k.signatures]


def _cached(d: Any, sig: tuple[Any, ...]) -> bool:
    """Whether ``d`` holds ``sig`` compiled, or numba's disk cache does for this machine
    (its index names it: what ``Dispatcher.compile`` looks up first). numba has no public
    test for a cached signature: where its cache's internals differ from numba 0.60-0.68's,
    the entry is loaded instead, as a first call would."""
    cache = getattr(d, "_cache", None)
    if sig in d.overloads or not _caches(d) or not getattr(cache, "_enabled", True):
        return True  # (a kernel numba does not cache: what a process compiled ahead would be lost)
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


def _shares(kernels: Sequence[RecordedKernel], processes: int) -> list[list[RecordedKernel]]:
    """At most ``processes`` lists, longest-first onto the least loaded. The first share
    is this process's."""
    n = max(1, min(processes, len(kernels)))
    shares: list[list[RecordedKernel]] = [[] for _ in range(n)]
    load = [0.0] * n
    for k in sorted(kernels, key=lambda k: -k.seconds):
        i = min(range(n), key=lambda j: load[j])
        # (a process other than this one first imports agentloop: ~2 s)
        load[i] += k.seconds + (2.0 if i > 0 and not shares[i] else 0.0)
        shares[i].append(k)
    return [s for s in shares if s] or [[]]


@contextlib.contextmanager
def _cache_saves_locked(lock: Path) -> Iterator[None]:
    """numba's cache saves in this process hold ``lock`` (an inter-process lock on a file)
    while the block runs. A save reads the function's index, picks the next free data
    file and writes both: two processes saving one function's signatures at once could
    lose an entry or point it at the other's machine code."""
    from numba.core import caching

    original = caching.IndexDataCacheFile.save

    def save(self: Any, key: Any, data: Any) -> None:
        with _locked(lock):
            original(self, key, data)

    caching.IndexDataCacheFile.save = save  # type: ignore[method-assign]
    try:
        yield
    finally:
        caching.IndexDataCacheFile.save = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "r+b") as f:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # (retries for 10 s; a save takes milliseconds)
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Worker:
    """A process compiling one share: ``python -P -m agentloop.precompile --compile``,
    importing this process's agentloop (its folder first on ``PYTHONPATH``; ``-P`` keeps
    the working directory off the path, where another checkout may lie). The share goes
    on its stdin as one line, and the pipe stays open while it runs: it exits at once
    where the pipe closes early (this process killed). Its error output goes to a file,
    not a pipe, which could fill and stall it."""

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, share: Sequence[RecordedKernel], lock: Path) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get(
            "PYTHONPATH")])])}
        self.process = subprocess.Popen([sys.executable, "-P", "-m", "agentloop.precompile", "--compile",
                                         "--lock", str(lock)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self.log, env=env)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([k.to_json() for k in share]).encode() + b"\n")
        self.process.stdin.flush()

    def wait(self) -> int:
        assert self.process is not None
        code = self.process.wait()
        self._close_stdin()
        return code

    def stop(self) -> None:
        """Kill the process where it still runs, reap it, close its files."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self._close_stdin()
        self.log.close()

    def _close_stdin(self) -> None:
        assert self.process is not None
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def error_output(self, limit: int = 2000) -> str:
        """The end of what the process wrote to stderr (a traceback where it failed)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


@contextlib.contextmanager
def _workers(shares: Sequence[Sequence[RecordedKernel]], lock: Path) -> Iterator[list[_Worker]]:
    """A worker for each share, stopped on the way out (an interrupted wait leaves no
    process behind). A worker that cannot start (or takes no input) raises
    ``KernelCompileError``."""
    workers: list[_Worker] = []
    try:
        for share in shares:
            workers.append(_Worker())  # (before it starts: a failed start still closes its files)
            try:
                workers[-1].start(share, lock)
            except OSError as e:  # (BrokenPipeError too: a process that died at once)
                raise KernelCompileError(f"could not start a process to compile kernels ({sys.executable}): {e}; "
                                         "they compile at their first call instead") from e
        yield workers
    finally:
        for w in workers:
            w.stop()


def _read_share() -> list[RecordedKernel]:
    """In a worker: the share, the first line on stdin, read from the file descriptor
    (Python's buffered stdin, read by the watch below as well, would hold a lock that a
    daemon thread keeps at the interpreter's exit: a fatal error)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1 << 16)
        if not chunk:
            raise SystemExit("no share on stdin: the parent process is gone")
        data += chunk
    return [RecordedKernel.from_json(k) for k in json.loads(data)]


def _watch_parent() -> None:
    """In a worker: exit where the parent's end of stdin closes (the parent died)."""
    def watch() -> None:
        while os.read(0, 4096):
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


# ---- recording ---------------------------------------------------------------------------


def _record_workload() -> Iterator[str]:
    """What the recording runs, naming each part after it ran: the demo (the engine's loop
    over the demo tools' grammar), then the grammar API's ops, with one numba thread and
    with several (kernels come in one-thread and threaded builds, taken by the thread
    count), a step of 20 tools over the whole lattice (large supports take the
    threaded builds of the live-list passes), and steps where the model is sure of a text
    answer while the canvas continues a call (at a low temperature: pruning's bounded
    sweep and the log-space passes, which a first such step in a run would otherwise
    spend ~40 s compiling), a step under a huge finite mask (the masks' stand-ins), and
    steps on the path logits on a GPU take (``device_passes``, its torch ops on the CPU
    here)."""
    import numba as nb
    import torch
    from click.testing import CliRunner

    from . import cli
    from .cli import DEMO_TOOLS, main
    from .grammar import byte_tokenizer, compile_tools

    first_run = cli._precompile_first_run
    cli._precompile_first_run = lambda: None  # (the demo's kernels compile here, where the clock sees them)
    try:
        for threads in sorted({1, nb.config.NUMBA_NUM_THREADS}):
            nb.set_num_threads(threads)
            result = CliRunner().invoke(main, ["demo"])
            if result.exit_code != 0:
                raise RuntimeError(f"the demo failed while recording:\n{result.output}")
    finally:
        cli._precompile_first_run = first_run
    yield "demo"
    tok = byte_tokenizer()
    g = compile_tools(DEMO_TOOLS, tok, "gemma4")
    schemas = json.loads((SIGNATURES_FILE.parent / "tool_schemas.json").read_text())
    five, big = (compile_tools(schemas[:n], tok, "gemma4") for n in (5, 20))
    logits = torch.randn(64, g.stats.vocab_size, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(256, big.stats.vocab_size)  # (every canvas alike: pruning gives up)
    for threads in sorted({1, nb.config.NUMBA_NUM_THREADS}):
        nb.set_num_threads(threads)
        g.viterbi(logits)
        g.sample(logits)
        g.marginals(logits)
        g.marginals(logits[None].expand(2, -1, -1))
        big.denoise_step(flat, prune=False)
        big.denoise_step(flat)
        for grammar in (g, five, big):  # (where the support is small, mid-sized, large)
            for temperature in (1.0, 0.2):
                grammar.denoise_step(**_text_where_call(grammar, tok, temperature))
        both = _text_where_call(five, tok, 0.2)  # (a batch: one canvas in log space, one not)
        both["logits"] = torch.stack([both["logits"], torch.randn_like(both["logits"]) * 3])  # (2, L, V)
        both["state"], both["out"] = [both["state"], five.start_state], torch.empty_like(both["logits"])
        five.denoise_step(**both)
        # logits masked with a huge finite value that canvases cannot all avoid (the pad token at
        # -1e20: the masks' stand-ins); then the device path's host kernels (a CUDA machine's steps;
        # its torch passes run here on the CPU)
        masked = logits.clone()
        masked[:, g.vocab.pad_id] = -1e20
        for device_path in (False, True):
            g._device_passes_on_cpu = device_path
            try:
                g.denoise_step(masked, out=torch.empty_like(masked))
                if device_path:
                    g.denoise_step(logits, out=torch.empty_like(logits))
                    g.denoise_step(**_text_where_call(g, tok, 0.2))
            finally:
                del g._device_passes_on_cpu
    yield "grammar API"


def _text_where_call(g: Any, tok: Any, temperature: float) -> dict[str, Any]:
    """``denoise_step``'s arguments for a step where the model is sure of a text answer
    (30 nats ahead) and the canvas continues a call from ``<|tool_call>``: a language that
    forbids what the model wants, whose weight can lie far outside float64's range."""
    import torch

    ids = tok.encode("I cannot look that up, but Lisbon is usually mild and sunny.", add_special_tokens=False).ids
    logits = torch.randn(256, g.stats.vocab_size, generator=torch.Generator().manual_seed(1)) * 3  # (L, V)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = logits[:len(ids)].max(dim=1).values + 30
    logits /= temperature
    state = g.state_after(tok.encode("<|tool_call>", add_special_tokens=False).ids)
    return {"logits": logits, "generator": torch.Generator().manual_seed(0), "out": torch.empty_like(logits),
            "state": state}


def _recording() -> dict[str, Any]:
    """Runs the workload with a compile clock; -> the file's content."""
    import numba
    from numba.core import event

    by_function: dict[int, float] = {}  # id(dispatcher) -> seconds of its outermost compiles
    dispatchers: dict[int, Any] = {}  # id(dispatcher) -> the dispatcher
    starts: list[float] = []

    class Clock(event.Listener):  # (outermost compiles only: nested ones inside their time)
        def on_start(self, ev: Any) -> None:
            starts.append(time.perf_counter())

        def on_end(self, ev: Any) -> None:
            dt = time.perf_counter() - starts.pop()
            if not starts:
                d = ev.data["dispatcher"]
                by_function[id(d)] = by_function.get(id(d), 0.0) + dt
                dispatchers[id(d)] = d

    event.register("numba:compile", Clock())
    demo: dict[int, tuple[set[Any], float]] = {}  # id(dispatcher) -> (the signatures the demo compiled, their seconds)
    for part in _record_workload():
        if part == "demo":
            demo = {i: (set(d.signatures), by_function[i]) for i, d in dispatchers.items()}
    kernels = []
    for module, name, key, d in package_dispatchers():
        # (kernels called from Python only: one called only from kernels is compiled inside them)
        if id(d) not in by_function or not _caches(d):
            continue
        # (a kernel the demo calls is two entries where the rest of the workload added signatures:
        # the demo's first run compiles the demo's alone)
        demo_sigs, demo_seconds = demo.get(id(d), (set(), 0.0))
        for in_demo, seconds in ((True, demo_seconds), (False, by_function[id(d)] - demo_seconds)):
            sigs = [[_type_spec(t) for t in sig] for sig in d.signatures if (sig in demo_sigs) == in_demo]
            sigs = [s for s in sigs if all(t is not None for t in s)]
            if sigs:
                kernels.append({"module": module, "name": name, "key": _as_list(key), "demo": in_demo,
                                "seconds": round(max(seconds, 0.01), 2), "signatures": sigs})
    return {"numba": numba.__version__, "python": sys.version.split()[0], "kernels": kernels}


def package_dispatchers() -> Iterator[tuple[str, str, Any, Any]]:
    """(module, global's name, key, numba dispatcher) of each kernel of ``KERNEL_MODULES``,
    once each, under the module that defines it (see ``_kernel_globals`` for the key)."""
    seen: set[int] = set()
    for module in KERNEL_MODULES:
        for name, key, holder in _kernel_globals(importlib.import_module(module)):
            d = _as_dispatcher(holder)
            if d is None or id(d) in seen or d.py_func.__module__ != module:
                continue
            seen.add(id(d))
            yield module, name, key, d


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
    ap = argparse.ArgumentParser(prog="python -m agentloop.precompile",
                                 description=__doc__.split("\n\n")[0] + " Without options: compile the recorded "
                                 "kernels numba's cache lacks (as `agentloop precompile`).")
    ap.add_argument("--compile", action="store_true", help="compile the kernels given on stdin (a worker)")
    ap.add_argument("--lock", default=None, help="with --compile: the file locked around each cache save")
    ap.add_argument("--record", action="store_true",
                    help=f"record the kernels' signatures into {SIGNATURES_FILE} (runs the demo, fresh caches)")
    ap.add_argument("--record-here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile:
        share = _read_share()
        _watch_parent()
        with _cache_saves_locked(Path(args.lock)) if args.lock else contextlib.nullcontext():
            _compile(share)
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
