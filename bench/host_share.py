"""The host's share of a denoising step: what ``denoise_step`` costs without its passes
over the vocabulary, side by side with the whole step in one process.

On a GPU the vocabulary passes (atom statistics, the marginals write, the token draw:
``grammar/device_passes.py``) run where the logits are, and the host runs the rest: the
canvas DP over (L, atoms) statistics, pruning, the atom draw, the preparation of the
device passes' arguments, Python. That rest does not grow with the vocabulary, so a step
at Gemma's 262k tokens on a GPU costs at least this share. It is measured two ways, both
with the passes replayed from a first call, so that the host's caches stay as warm as on
a GPU machine, where no (L, V) pass runs through them:

* *host path*: the step as it runs for logits on the CPU, ``reduce_atoms`` handing back
  the statistics of a first call, the marginals write skipped, the token draw handing
  back its first tokens (the DP reads none of their outputs);
* *device path*: the step as it runs for logits on a GPU with triton (``device_passes``'
  Triton paths, here on CPU tensors), every host line of it run, its kernels stood in
  for: the reduction's stand-in writes the first call's statistics into the buffer that
  the reduction copies to the host (the bytes a copy off the device writes there), the
  draw's writes the first call's tokens, the others do nothing. This is the GPU's
  figure, less what only a GPU shows: launching the kernels, the waits for the copies,
  and the driver's staging of copies from pageable memory.

The whole step, its passes, and the two replayed steps alternate; medians of each.
``--baseline REV`` measures the replayed steps of a baseline commit beside the working
tree's, alternating, as ``bench/constraint_ab.py`` does for the whole step (both versions'
kernels compiled in the process: ``bench/fresh_kernels.py``).

    python bench/host_share.py                                   # BPE 4k and Gemma 262k, 1, 5 and 20 tools
    python bench/host_share.py --tokenizers bpe-4k --tools 20 --repeats 100
    python bench/host_share.py --baseline HEAD~1 --tokenizers gemma3-262k --tools 1 --out /tmp/ab.md

Writes ``bench/results/host_share.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if any(a == "--baseline" or a.startswith("--baseline=") for a in sys.argv[1:]):
    # an A/B: both versions' kernels compiled in this process, none loaded from numba's
    # cache (see its docstring), so before agentloop is imported
    import bench.fresh_kernels  # noqa: E402,F401

import numpy as np  # noqa: E402
import torch  # noqa: E402

import agentloop.grammar as current  # noqa: E402
from bench.constraint import step_bench_command, step_bench_header, step_bench_threads  # noqa: E402
# (it imports bench.fresh_kernels: after agentloop, so that a plain run's kernels still load from numba's cache)
from bench.constraint_ab import export_baseline, revisions, table_lines  # noqa: E402
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The passes over (L, V) the host runs for logits on the CPU (``grammar.canvas``).
VOCABULARY_PASSES = ("reduce_atoms", "write_marginals", "sample_tokens")
#: The kernels of ``grammar.fused_kernel`` the device path launches: what its replay
#: stands in for.
KERNELS = ("tile_stats", "combine_tiles", "log_marginals", "tile_masses", "draw_in_atoms")


def first_result(stored: dict[Any, Any], key: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` at the first call under ``key``, that result again at the next ones."""
    if key not in stored:
        stored[key] = fn(*args)
    return stored[key]


@contextmanager
def patched(module: Any, replacements: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """``module``'s functions replaced while inside."""
    real = {name: getattr(module, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(module, name, fn)


def timed_passes(grammar: Any, spent: list[float]) -> Any:
    """The host path's vocabulary passes of the package ``grammar`` (``agentloop.grammar``
    or a baseline's) as they are, their time added to ``spent[0]``."""
    dp = grammar.canvas

    def clocked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    return patched(dp, {name: clocked(getattr(dp, name)) for name in VOCABULARY_PASSES})


def replayed_passes(grammar: Any, stored: dict[Any, Any]) -> Any:
    """The host path's vocabulary passes replayed from their first call, kept in
    ``stored`` (for one logits tensor only)."""
    dp = grammar.canvas
    real = {name: getattr(dp, name) for name in VOCABULARY_PASSES}

    def reduce_atoms(logits: Any, atoms: Any, want_sum: bool, want_x: bool, block_sums: Any = None) -> Any:
        return first_result(stored, ("atoms", want_sum, want_x), real["reduce_atoms"], logits, atoms, want_sum,
                            want_x, block_sums)

    return patched(dp, {"reduce_atoms": reduce_atoms, "write_marginals": lambda *a: None,
                        "sample_tokens": lambda *a: first_result(stored, "tokens", real["sample_tokens"], *a)})


class StandIn:
    """A kernel's stand-in, launched as the kernel is (``kernel[grid](*args, **meta)``)."""

    def __init__(self, run: Callable[..., None]) -> None:
        self.run = run

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self.run


def replayed_device_work(grammar: Any, stored: dict[Any, Any]) -> Any:
    """The device path's Triton paths with their kernels stood in for, from the results of
    a first call of the torch paths (the same numbers: ``tests/test_device_passes.py``),
    kept in ``stored`` (for one logits tensor only). Every host line of the Triton paths
    runs: the buffers allocated, the statistics read back from the reduction's buffer,
    the references and the draw's plan copied to the device."""
    dv = grammar.device_passes
    real = {name: getattr(dv, name) for name in ("_reduce_atoms_triton", "_draw_triton", "_reduce_atoms_torch",
                                                 "_draw_torch", "_row_chunks")}
    now: dict[str, Any] = {}  # the first results for the pass in flight

    def with_host_rows(fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with the rows cut for the CPU (the torch paths' (rows, V) temporaries)."""
        def run(*args: Any) -> Any:
            with patched(dv, {"_row_chunks": real["_row_chunks"]}):
                return fn(*args)
        return run

    def reduce_atoms(x: Any, layout: Any, want_sum: bool, want_x: bool) -> Any:
        now["stats"] = first_result(stored, ("device atoms", want_sum, want_x),
                                    with_host_rows(real["_reduce_atoms_torch"]), x, layout, want_sum, want_x)
        return real["_reduce_atoms_triton"](x, layout, want_sum, want_x)

    def draw(x: Any, layout: Any, *plan: Any) -> Any:
        now["tokens"] = first_result(stored, "device tokens", with_host_rows(real["_draw_torch"]), x, layout, *plan)
        return real["_draw_triton"](x, layout, *plan)

    def combine_tiles(*args: Any, WANT_SUM: bool, WANT_X: bool, **meta: Any) -> None:
        """What the kernel leaves in its outputs, in either version's layout of them: since
        session 46 (rowmax, out, amax, aarg, N, ...) with amax float32 and aarg int32 (-1:
        none) apart, before it (rowmax, out, N, ...) with both as float64 planes of out
        (aarg V: none) ahead of the sums."""
        rowmax_dev, out = args[5], args[6].numpy()
        rowmax, rowmax64, asum, asumx, amax, aarg = now["stats"]
        rowmax_dev.copy_(rowmax)
        N, K = amax.shape
        planes = [asum] * WANT_SUM + [asumx] * WANT_X
        if isinstance(args[7], torch.Tensor):
            args[7].numpy()[:] = amax.ravel()
            args[8].numpy()[:] = aarg.ravel()
        else:  # (the float64 aarg made once: the stand-in only copies)
            V = args[11]
            planes = [amax, first_result(stored, ("aarg as float64", id(aarg)), lambda: np.where(aarg < 0, V, aarg)
                                         .astype(np.float64))] + planes
        out[:N] = rowmax64
        for i, plane in enumerate(planes):
            out[N + i * N * K:N + (i + 1) * N * K] = plane.ravel()

    def draw_in_atoms(*args: Any, **meta: Any) -> None:
        args[11].numpy()[:] = now["tokens"]

    kernels = SimpleNamespace(**{name: StandIn(lambda *a, **k: None) for name in KERNELS})
    kernels.combine_tiles, kernels.draw_in_atoms = StandIn(combine_tiles), StandIn(draw_in_atoms)
    cuda = torch.device("cuda")  # (a descriptor: no GPU needed)
    return patched(dv, {"_reduce_atoms_triton": reduce_atoms, "_draw_triton": draw, "_kernels": lambda: kernels,
                        "_use_kernel": lambda kernel, device, name: kernel != "torch",
                        # rows cut for a GPU, where a 256 x 262k canvas goes in one launch, not eight
                        "_row_chunks": lambda N, V, device=None: real["_row_chunks"](N, V, cuda)})


class Version:
    """One version's grammar for the benchmark's logits, and its steps: whole (host path),
    and replayed on the host path and on the device path."""

    def __init__(self, grammar: Any, tools: list[dict[str, Any]], tok: Any, aliases: dict[str, str],
                 x: torch.Tensor) -> None:
        self.grammar = grammar
        self.g = grammar.compile_tools(tools, tok, wire_format="gemma4", aliases=aliases)
        self.x, self.out = x, torch.empty_like(x)
        self.stored: dict[Any, Any] = {}
        want = self.step()
        with replayed_passes(grammar, self.stored):
            assert self.step().argmax == want.argmax, "the replayed passes must give the step's own Viterbi canvas"
        with self.replay("device"):
            got = self.step()
            assert (got.argmax, got.sample) == (want.argmax, want.sample), \
                "the device path must give the host path's Viterbi canvas and sample"
        assert not grammar.device_passes._kernel_failed, grammar.device_passes._kernel_failed  # (no fallback to torch)

    def step(self) -> Any:
        return self.g.denoise_step(self.x, torch.Generator().manual_seed(1), out=self.out)

    @contextmanager
    def replay(self, path: str) -> Iterator[None]:
        """The step replayed on ``path`` ("host" or "device") while inside."""
        if path == "host":
            with replayed_passes(self.grammar, self.stored):
                yield
            return
        # (set on the instance, which the compile cache shares: the host path is back after)
        self.g._device_passes_on_cpu = True
        try:
            with replayed_device_work(self.grammar, self.stored):
                yield
        finally:
            del self.g._device_passes_on_cpu

    def whole(self, spent: list[float]) -> float:
        """The whole step on the host (seconds), its passes' time added to ``spent[0]``."""
        with timed_passes(self.grammar, spent):
            t0 = time.perf_counter()
            self.step()
            return time.perf_counter() - t0

    def replayed(self, path: str) -> float:
        """The replayed step on ``path``, seconds: the third of three, the whole step's
        passes having flushed the host's caches (268 MB of logits at 262k), which a GPU's
        don't."""
        with self.replay(path):
            self.step()
            self.step()
            t0 = time.perf_counter()
            self.step()
            return time.perf_counter() - t0


def measure(versions: dict[str, Version], repeats: int) -> dict[str, float]:
    """Medians (ms) per version (keys prefixed by its name): the whole step, its vocabulary
    passes, the replayed host path and device path; each round runs each version in turn."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, v in versions.items():
            spent = [0.0]
            times.setdefault(f"{name}step_ms", []).append(v.whole(spent))
            times.setdefault(f"{name}passes_ms", []).append(spent[0])
            for path in ("host", "device"):
                times.setdefault(f"{name}{path}_ms", []).append(v.replayed(path))
    out = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    out.update({k.replace("_ms", "_min_ms"): min(t) * 1e3 for k, t in times.items() if k.endswith(("host_ms",
                                                                                                    "device_ms"))})
    return out


def markdown(rows: list[dict[str, Any]], command: str, threads: int, baseline: str | None) -> str:
    lines = [*step_bench_header("The host's share of a denoising step (the vocabulary passes replayed)", command,
                                f"{threads} torch/numba thread(s)")]
    if baseline:
        lines[-1] += f"; baseline: {baseline}"
    lines += ["", "`denoise_step` at L=256 under random N(0, 3) logits, gemma4 wire format; medians, all steps "
              "alternating. *step*: the whole step on the host; *passes*: its passes over the (L, V) logits inside "
              "it (atom statistics, marginals write, token draw); *host path*: the step with those passes replayed "
              "from a first call (warm caches, as on a GPU machine, whose device runs the passes); *device path*: "
              "the step as logits on a GPU with triton run it (`device_passes`' Triton paths), every host line of "
              "it run and its kernels stood in for (the reduction's stand-in writing the statistics into the "
              "buffer the host reads them from, as the copy off the device does). A GPU step costs its device "
              "path's share plus the device passes, their launches and the waits for their copies.", ""]
    if baseline:
        columns = ["tokenizer", "tools", "states", "host path ms: baseline / current", "ratio",
                   "device path ms: baseline / current", "ratio"]
        cells = [[r["tokenizer"], r["tools"], r["states"], f"{r['b_host_ms']:.3f} / {r['host_ms']:.3f}",
                  f"{r['host_ms'] / r['b_host_ms']:.2f}x", f"{r['b_device_ms']:.3f} / {r['device_ms']:.3f}",
                  f"{r['device_ms'] / r['b_device_ms']:.2f}x"] for r in rows]
    else:
        columns = ["tokenizer", "tools", "states", "step ms", "passes ms", "host path ms (min)",
                   "device path ms (min)", "device path's share of the step"]
        cells = [[r["tokenizer"], r["tools"], r["states"], f"{r['step_ms']:.2f}", f"{r['passes_ms']:.2f}",
                  f"{r['host_ms']:.3f} ({r['host_min_ms']:.3f})", f"{r['device_ms']:.3f} ({r['device_min_ms']:.3f})",
                  f"{r['device_ms'] / r['step_ms']:.0%}"] for r in rows]
    return "\n".join(lines + table_lines(columns, cells)) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", nargs="+", default=["bpe-4k", "gemma3-262k"], choices=sorted(LOADERS))
    ap.add_argument("--tools", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--repeats", type=int, default=0, help="rounds (default: 60 at 4k, 15 at 262k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="a git revision to measure beside the working tree")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/host_share.md")
    args = ap.parse_args(argv)
    step_bench_threads(args.threads)
    packages = {"": current}
    if args.baseline:
        packages["b_"] = export_baseline(args.baseline, Path(tempfile.mkdtemp(prefix="host_share_baseline_")))
        args.baseline = revisions(args.baseline)[0]
    rows = []
    for name in args.tokenizers:
        tok, aliases = LOADERS[name]()
        for n in args.tools:
            tools = tool_schemas(name)[:n]
            V = current.compile_tools(tools, tok, wire_format="gemma4", aliases=aliases).vocab.size
            x = torch.randn(256, V, generator=torch.Generator().manual_seed(0)) * 3
            versions = {key: Version(pkg, tools, tok, aliases, x) for key, pkg in packages.items()}
            repeats = args.repeats or (60 if V < 50_000 else 15)
            r = {"tokenizer": name, "tools": n, "states": versions[""].g.stats.dfa_states,
                 **measure(versions, repeats)}
            rows.append(r)
            line = (f"{name} x {n} tools: step {r['step_ms']:.2f} ms, passes {r['passes_ms']:.2f} ms, "
                    f"host path {r['host_ms']:.3f} ms, device path {r['device_ms']:.3f} ms")
            if args.baseline:
                line += f" (baseline: host path {r['b_host_ms']:.3f} ms, device path {r['b_device_ms']:.3f} ms)"
            print(line, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, step_bench_command("host_share.py", argv), args.threads, args.baseline))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
