"""What low temperatures cost: ``denoise_step`` on logits N(0, 3), whose weights stay
within float64's range (the fast passes), against N(0, 100) (a model's logits at
temperature ~0.02: atoms 708+ nats below their row's best underflow, which pruning
leaves out where they weigh nothing) and N(0, 300) (~0.01: the valid canvases weigh
e^-2000 of the best tokens', and the step runs in log space, grammar/log_canvas.py, over
the cells a log-space sweep keeps), side by side in one process, alternating; it counts
the canvases that went to log space and the steps that pruned.

    python bench/log_space.py                       # 1, 5 and 20 tools, BPE 4k, one thread
    python bench/log_space.py --tools 1 --repeats 9

Writes ``bench/results/log_space.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import torch  # noqa: E402

from agentloop.grammar import compile_tools  # noqa: E402
from agentloop.grammar.compiled import CompiledGrammar  # noqa: E402
from bench.constraint import (step_bench_command, step_bench_header, step_bench_options,  # noqa: E402
                              step_bench_threads)
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The logit scales: within float64's range, with atoms beyond it, with the valid
#: canvases beyond it.
SCALES = (3.0, 100.0, 300.0)


def measure(tokenizer: str, n_tools: int, length: int, repeats: int) -> dict[str, Any]:
    """Median ms of denoise_step at each scale, and the shares of canvases redone in log
    space and of steps that pruned."""
    tok, aliases = LOADERS[tokenizer]()
    tools = tool_schemas(tokenizer)[:n_tools]
    g = compile_tools(tools, tok, wire_format="gemma4", aliases=aliases)
    V = tok.get_vocab_size(with_added_tokens=True)
    out = torch.empty(length, V)
    logits = {s: torch.randn(length, V, generator=torch.Generator().manual_seed(0)) * s for s in SCALES}
    times: dict[float, list[float]] = {s: [] for s in SCALES}
    redone = dict.fromkeys(SCALES, 0)
    pruned = dict.fromkeys(SCALES, 0)
    for s in SCALES:  # warm up (compiles, the support, the messages)
        g.denoise_step(logits[s], torch.Generator().manual_seed(0), out=out)
    redo = CompiledGrammar._log_space
    current = [SCALES[0]]

    def counted(self: CompiledGrammar, *args: Any, **kwargs: Any) -> Any:
        redone[current[0]] += 1
        return redo(self, *args, **kwargs)

    CompiledGrammar._log_space = counted  # type: ignore[method-assign]
    try:
        for _ in range(repeats):
            for s in SCALES:
                current[0] = s
                t0 = time.perf_counter()
                step = g.denoise_step(logits[s], torch.Generator().manual_seed(0), out=out)
                times[s].append(time.perf_counter() - t0)
                pruned[s] += step.pruned
    finally:
        CompiledGrammar._log_space = redo  # type: ignore[method-assign]
    return {"tokenizer": tokenizer, "tools": n_tools, "states": g.stats.dfa_states,
            **{f"ms_{s:g}": statistics.median(times[s]) * 1e3 for s in SCALES},
            **{f"log_space_{s:g}": redone[s] / repeats for s in SCALES},
            **{f"pruned_{s:g}": pruned[s] / repeats for s in SCALES}}


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [*step_bench_header("Canvases redone in log space", command, f"{numba.get_num_threads()} numba thread(s)"),
             "", "`denoise_step` at L=256, medians, the scales alternating; each scale: ms, the share of the steps "
             "whose canvas was redone in log space, the share that pruned, and the ratio to N(0, 3).", "",
             "| tokenizer | tools | states | " + " | ".join(f"N(0, {s:g}) ms | log space | pruned | ratio"
                                                      for s in SCALES) + " |",
             "|---|---|---|" + "---|---|---|---|" * len(SCALES)]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['tools']} | {r['states']} | " + " | ".join(
            f"{r[f'ms_{s:g}']:.1f} | {r[f'log_space_{s:g}']:.0%} | {r[f'pruned_{s:g}']:.0%} | "
            f"{r[f'ms_{s:g}'] / r['ms_3']:.1f}x" for s in SCALES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_bench_options(ap, 5, REPO / "bench/results/log_space.md")
    args = ap.parse_args(argv)
    step_bench_threads(args.threads)
    rows = []
    for n in args.tools:
        rows.append(measure(args.tokenizer, n, args.length, args.repeats))
        r = rows[-1]
        print(f"{args.tokenizer} x {n} tools: " + ", ".join(
            f"N(0, {s:g}) {r[f'ms_{s:g}']:.1f} ms ({r[f'log_space_{s:g}']:.0%} in log space, "
            f"{r[f'pruned_{s:g}']:.0%} pruned)" for s in SCALES), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, step_bench_command("log_space.py", argv)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
