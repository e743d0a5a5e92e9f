"""What huge finite masks cost: each op on logits N(0, 2) as they are, with the tokens
that end a canvas (``<turn|>``, ``<|tool_response>``) at 0, and with them masked at
float32's lowest at every position, side by side in one process, alternating. Every
valid canvas then passes one mask, at another position: the masks stand in
(``agentloop.grammar.masks``), and the canvas runs in log space over its whole support,
since a forward sweep cannot see a mask that every canvas passes at its end. The
masked answers are checked against those with the end tokens at 0 (the same law: each
canvas carries the mask once).

    python bench/masks.py                       # 1 and 20 tools, BPE 4k, one thread
    python bench/masks.py --tools 1 --repeats 9

Writes ``bench/results/masks.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import torch  # noqa: E402

from agentloop.grammar import compile_tools  # noqa: E402
from bench.constraint import (step_bench_command, step_bench_header, step_bench_options,  # noqa: E402
                              step_bench_threads)
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The logits measured: as drawn, the end tokens at 0, and masked.
CASES = ("plain", "ends at 0", "ends masked")
OPS = ("viterbi", "marginals", "denoise_step")


def measure(tokenizer: str, n_tools: int, length: int, repeats: int) -> dict[str, Any]:
    """Median ms of each op on each case, and the masked answers' largest difference
    from the end tokens at 0."""
    tok, aliases = LOADERS[tokenizer]()
    tools = tool_schemas(tokenizer)[:n_tools]
    g = compile_tools(tools, tok, wire_format="gemma4", aliases=aliases)
    ends = [tok.token_to_id(t) for t in ("<turn|>", "<|tool_response>")]
    base = torch.randn(length, g.vocab.size, generator=torch.Generator().manual_seed(0)) * 2
    at_zero, masked = base.clone(), base.clone()
    at_zero[:, ends] = 0.0
    masked[:, ends] = torch.finfo(torch.float32).min
    logits = dict(zip(CASES, (base, at_zero, masked)))
    out = torch.empty(length, g.vocab.size)
    ops: dict[str, Callable[[torch.Tensor], Any]] = {
        "viterbi": g.viterbi,
        "marginals": lambda x: g.marginals(x, out=out),
        "denoise_step": lambda x: g.denoise_step(x, torch.Generator().manual_seed(0), out=out),
    }
    want = g.denoise_step(at_zero, torch.Generator().manual_seed(0))
    got = g.denoise_step(masked, torch.Generator().manual_seed(0))
    gap = float((want.log_marginals.exp() - got.log_marginals.exp()).abs().max())
    assert got.argmax == want.argmax and gap < 1e-5, (got.argmax == want.argmax, gap)
    times: dict[tuple[str, str], list[float]] = {(op, c): [] for op in OPS for c in CASES}
    for op in OPS:
        for c in CASES:  # (warm: compiles, supports)
            ops[op](logits[c])
        for _ in range(repeats):
            for c in CASES:
                t0 = time.perf_counter()
                ops[op](logits[c])
                times[op, c].append(time.perf_counter() - t0)
    return {"tokenizer": tokenizer, "tools": n_tools, "states": g.stats.dfa_states, "max_gap": gap,
            **{f"{op}|{c}": statistics.median(times[op, c]) * 1e3 for op in OPS for c in CASES}}


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [*step_bench_header("Huge finite masks every canvas must pass", command,
                                f"{numba.get_num_threads()} numba thread(s)"),
             "", "L as in the command (256 by default), logits N(0, 2), medians, the cases alternating; "
             "\"ends masked\": `<turn|>` and `<|tool_response>` at float32's lowest at every position; the ratio is "
             "to the same op with them at 0, whose answers the masked ones equal (largest marginal difference: "
             "the last column).", "",
             "| tokenizer | tools | states | op | plain ms | ends at 0 ms | ends masked ms | ratio | max diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for op in OPS:
            lines.append(f"| {r['tokenizer']} | {r['tools']} | {r['states']} | {op} | {r[f'{op}|plain']:.1f} | "
                         f"{r[f'{op}|ends at 0']:.1f} | {r[f'{op}|ends masked']:.1f} | "
                         f"{r[f'{op}|ends masked'] / r[f'{op}|ends at 0']:.1f}x | {r['max_gap']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_bench_options(ap, 5, REPO / "bench/results/masks.md")
    ap.set_defaults(tools=[1, 20])
    args = ap.parse_args(argv)
    step_bench_threads(args.threads)
    rows = []
    for n in args.tools:
        rows.append(measure(args.tokenizer, n, args.length, args.repeats))
        r = rows[-1]
        print(f"{args.tokenizer} x {n} tools: " + ", ".join(
            f"{op} {r[f'{op}|ends at 0']:.1f} -> {r[f'{op}|ends masked']:.1f} ms" for op in OPS), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, step_bench_command("masks.py", argv)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
