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
* *device path*: the step as it runs for logits on a GPU (``device_passes``, here on CPU
  tensors), with only the device's own work replayed (the torch ops of the atom
  statistics, of the marginals write and of the draw inside atoms): every host line of a
  GPU step runs, the statistics handed back as fresh host arrays (as a copy off the
  device leaves them; the wait for the copy aside). This is the GPU's figure.

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
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if any(a == "--baseline" or a.startswith("--baseline=") for a in sys.argv[1:]):
    # an A/B: both versions' kernels compiled in this process, none loaded from numba's
    # cache (see its docstring), so before agentloop is imported
    import bench.fresh_kernels  # noqa: E402,F401

import torch  # noqa: E402

import agentloop.grammar as current  # noqa: E402
from bench.constraint import step_bench_command, step_bench_header, step_bench_threads  # noqa: E402
# (it imports bench.fresh_kernels: after agentloop, so that a plain run's kernels still load from numba's cache)
from bench.constraint_ab import export_baseline, revisions, table_lines  # noqa: E402
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The passes over (L, V) the host runs for logits on the CPU (``grammar.canvas``).
VOCABULARY_PASSES = ("reduce_atoms", "write_marginals", "sample_tokens")
#: The device's own work in ``grammar.device_passes`` (its torch ops; a GPU runs Triton
#: kernels in their place where it has them): what the device path's replay skips.
DEVICE_WORK = ("_reduce_atoms_torch", "_log_marginals_torch", "_draw_torch")


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


def replayed_device_work(grammar: Any, stored: dict[Any, Any]) -> Any:
    """The device path's own device work replayed from its first call, kept in ``stored``
    (for one logits tensor only): the atom statistics come back as fresh host arrays (as
    from a copy off the device), the marginals write does nothing, the draw inside atoms
    hands back its first tokens. The host lines around them all run."""
    dv = grammar.device_passes
    real = {name: getattr(dv, name) for name in DEVICE_WORK}

    def reduce_atoms(x: Any, layout: Any, want_sum: bool, want_x: bool) -> Any:
        rowmax, *host = first_result(stored, ("device atoms", want_sum, want_x), real["_reduce_atoms_torch"], x,
                                     layout, want_sum, want_x)
        return (rowmax, *(a.copy() for a in host))

    return patched(dv, {"_reduce_atoms_torch": reduce_atoms, "_log_marginals_torch": lambda *a: a[-1],
                        "_draw_torch": lambda *a: first_result(stored, "device tokens", real["_draw_torch"], *a)})


class Version:
    """One version's grammar for the benchmark's logits, and its steps: whole (host path),
    and replayed on the host path and on the device path."""

    def __init__(self, grammar: Any, tools: list[dict[str, Any]], tok: Any, aliases: dict[str, str],
                 x: torch.Tensor) -> None:
        self.grammar = grammar
        self.g = grammar.compile_tools(tools, tok, wire_format="gemma4", aliases=aliases)
        self.x, self.out = x, torch.empty_like(x)
        self.stored: dict[Any, Any] = {}
        want = self.step().argmax
        with replayed_passes(grammar, self.stored):
            assert self.step().argmax == want, "the replayed passes must give the step's own Viterbi canvas"
        with self.replay("device"):
            assert self.step().argmax == want, "the device path must give the host path's Viterbi canvas"

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
              "the step as logits on a GPU run it (`device_passes`), the device's own work replayed: every host "
              "line of a GPU step, the atom statistics handed back as fresh host arrays (as a copy off the device "
              "leaves them). A GPU step costs its device path's share plus the device passes and the waits for "
              "their copies.", ""]
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
