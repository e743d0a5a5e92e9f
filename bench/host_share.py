"""The host's share of a denoising step: what ``denoise_step`` costs without its passes
over the vocabulary, side by side with the whole step in one process.

On a GPU the vocabulary passes (atom statistics, the marginals write, the token draw:
``grammar/device_passes.py``) run where the logits are, and the host runs the rest: the
canvas DP over (L, atoms) statistics, pruning, the atom draw, Python. That rest does not
grow with the vocabulary, so a step at Gemma's 262k tokens on a GPU costs at least this
share. Here it is measured by replaying the passes: ``reduce_atoms`` hands back the
statistics of a first call, the marginals write is skipped and the token draw hands back
its first tokens (the DP reads none of their outputs), so the host's caches stay as warm
as on a GPU machine, where no (L, V) pass runs through them. The whole step, the passes
inside it, and the replayed step alternate, medians of each.

    python bench/host_share.py                                   # BPE 4k and Gemma 262k, 1, 5 and 20 tools
    python bench/host_share.py --tokenizers bpe-4k --tools 20 --repeats 100

Writes ``bench/results/host_share.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agentloop.grammar import canvas as dp  # noqa: E402
from agentloop.grammar import compile_tools  # noqa: E402
from agentloop.grammar.compiled import CompiledGrammar  # noqa: E402
from bench.constraint import step_bench_command, step_bench_header, step_bench_threads  # noqa: E402
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The passes over (L, V) the host runs for logits on the CPU, and a GPU on its device.
VOCABULARY_PASSES = ("reduce_atoms", "write_marginals", "sample_tokens")


@contextmanager
def timed_passes(spent: list[float]) -> Iterator[None]:
    """The vocabulary passes as they are, their time added to ``spent[0]``."""
    real = {name: getattr(dp, name) for name in VOCABULARY_PASSES}

    def clocked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    for name, fn in real.items():
        setattr(dp, name, clocked(fn))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(dp, name, fn)


@contextmanager
def replayed_passes(stored: dict[Any, Any]) -> Iterator[None]:
    """The vocabulary passes replayed from their first call, kept in ``stored`` (for one
    logits tensor only)."""
    real = {name: getattr(dp, name) for name in VOCABULARY_PASSES}

    def reduce_atoms(logits: Any, atoms: Any, want_sum: bool, want_x: bool, block_sums: Any = None) -> Any:
        key = ("atoms", want_sum, want_x)
        if key not in stored:
            stored[key] = real["reduce_atoms"](logits, atoms, want_sum, want_x, block_sums)
        return stored[key]

    def sample_tokens(*args: Any) -> Any:
        if "tokens" not in stored:
            stored["tokens"] = real["sample_tokens"](*args)
        return stored["tokens"]

    dp.reduce_atoms, dp.write_marginals, dp.sample_tokens = reduce_atoms, lambda *a: None, sample_tokens
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(dp, name, fn)


def measure(g: CompiledGrammar, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Medians (ms) of the whole step, its vocabulary passes, and the step with them
    replayed; the replayed step's Viterbi canvas is checked against the real one's. Each
    round times the whole step, then the replayed one after two untimed replays: the whole
    step's passes flush the host's caches (268 MB of logits at 262k), which a GPU's don't."""
    out = torch.empty_like(x)
    step = lambda: g.denoise_step(x, torch.Generator().manual_seed(1), out=out)  # noqa: E731
    want = step().argmax
    stored: dict[Any, Any] = {}
    with replayed_passes(stored):
        assert step().argmax == want, "the replayed passes must give the step's own Viterbi canvas"
    whole, passes, host = [], [], []
    spent = [0.0]
    for _ in range(repeats):
        spent[0] = 0.0
        with timed_passes(spent):
            t0 = time.perf_counter()
            step()
            whole.append(time.perf_counter() - t0)
        passes.append(spent[0])
        with replayed_passes(stored):
            step()
            step()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    return {"step_ms": ms(whole), "passes_ms": ms(passes), "host_ms": ms(host), "host_min_ms": min(host) * 1e3}


def markdown(rows: list[dict[str, Any]], command: str, threads: int) -> str:
    lines = [*step_bench_header("The host's share of a denoising step (the vocabulary passes replayed)", command,
                                f"{threads} torch/numba thread(s)"), "",
             "`denoise_step` at L=256 under random N(0, 3) logits, gemma4 wire format; medians, the three alternating. "
             "*step*: the whole step on the host; *passes*: its passes over the (L, V) logits inside it (atom "
             "statistics, marginals write, token draw); *host share*: the step with those passes replayed from a "
             "first call (warm caches, as on a GPU machine, whose device runs the passes). A GPU step costs its "
             "host share plus the device passes and their transfers.", "",
             "| tokenizer | tools | states | step ms | passes ms | host share ms (min) | host share of the step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['tools']} | {r['states']} | {r['step_ms']:.2f} | {r['passes_ms']:.2f} | "
                     f"{r['host_ms']:.3f} ({r['host_min_ms']:.3f}) | {r['host_ms'] / r['step_ms']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", nargs="+", default=["bpe-4k", "gemma3-262k"], choices=sorted(LOADERS))
    ap.add_argument("--tools", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--repeats", type=int, default=0, help="rounds (default: 60 at 4k, 15 at 262k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/host_share.md")
    args = ap.parse_args(argv)
    step_bench_threads(args.threads)
    rows = []
    for name in args.tokenizers:
        tok, aliases = LOADERS[name]()
        for n in args.tools:
            g = compile_tools(tool_schemas(name)[:n], tok, wire_format="gemma4", aliases=aliases)
            x = torch.randn(256, g.vocab.size, generator=torch.Generator().manual_seed(0)) * 3
            repeats = args.repeats or (60 if g.vocab.size < 50_000 else 15)
            r = {"tokenizer": name, "tools": n, "states": g.stats.dfa_states, **measure(g, x, repeats)}
            rows.append(r)
            print(f"{name} x {n} tools: step {r['step_ms']:.2f} ms, passes {r['passes_ms']:.2f} ms, "
                  f"host share {r['host_ms']:.3f} ms", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, step_bench_command("host_share.py", argv), args.threads))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
