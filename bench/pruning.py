"""What pruning (grammar/pruning.py) saves: ``denoise_step`` over the cells it keeps
against the whole lattice (``prune=False``), side by side in one process, the two
alternating, with their outputs compared.

Logits: random N(0, s), and a model that knows what it writes, made so: a valid call's
tokens ``lead`` nats ahead of N(0, 2) noise at every position (12: sure of it; 4: a
flatter model, the call a few times likelier than the rest). With ``--demo``, the steps of
the bundled demo model's own loop on four requests too (its grammars, L=64), replayed.

    python bench/pruning.py                       # BPE 4k, 1, 5 and 20 tools, L=256, one thread
    python bench/pruning.py --tools 20 --repeats 9 --demo

Writes ``bench/results/pruning.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agentloop.grammar import compile_tools  # noqa: E402
from agentloop.grammar.compiled import CompiledGrammar  # noqa: E402
from bench.constraint import (step_bench_command, step_bench_header, step_bench_options,  # noqa: E402
                              step_bench_threads)
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The call the "model" logits are sure of (the first tool of every set).
CALL = '<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>,days:3}<tool_call|><|tool_response>'


def logit_kinds(g: CompiledGrammar, tok: Any, L: int) -> dict[str, torch.Tensor]:
    V = g.vocab.size
    ids = tok.encode(CALL, add_special_tokens=False).ids
    canvas = ids + [g.vocab.pad_id] * (L - len(ids))
    assert g.accepts(canvas), "the call's canvas must be valid"
    noise = lambda s: torch.randn(L, V, generator=torch.Generator().manual_seed(0)) * s  # noqa: E731
    kinds = {f"N(0, {s:g})": noise(s) for s in (1.0, 2.0, 3.0)}
    for lead in (12.0, 4.0):
        x = noise(2.0)
        x[torch.arange(L), torch.tensor(canvas)] += lead
        kinds[f"call +{lead:g}"] = x
    return kinds


def kept_share(g: CompiledGrammar, x: torch.Tensor, state: int, partial: bool) -> float:
    """The share of the support's cells the step keeps (1.0 where pruning gives up)."""
    from agentloop.grammar import canvas as dp

    L = x.shape[0]
    sc = g._scores(x[None].numpy())
    gmax = dp.group_max(sc.amax, g._group_plan)
    kept, pruned, _ = g._step_support(sc, slice(0, L), state, partial, True, sums=True, gmax=gmax)
    return float(kept.offsets[-1] / g._support(L, state, partial).offsets[-1]) if pruned else 1.0


def compare(g: CompiledGrammar, x: torch.Tensor, repeats: int, state: int | None = None,
            partial: bool = False) -> dict[str, Any]:
    """Median ms of the step both ways, the kept share, and how far the outputs differ."""
    out = torch.empty_like(x)
    s0 = g.start_state if state is None else state
    step = lambda prune: g.denoise_step(x, torch.Generator().manual_seed(1), state=s0, partial=partial,  # noqa: E731
                                        out=out, prune=prune)
    whole = step(False)
    whole_lm = whole.log_marginals.clone()
    kept = step(True)
    likely = whole_lm > -30
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for prune in (False, True):
            t0 = time.perf_counter()
            step(prune)
            times[prune].append(time.perf_counter() - t0)
    return {
        "whole_ms": statistics.median(times[False]) * 1e3, "pruned_ms": statistics.median(times[True]) * 1e3,
        "kept": kept_share(g, x, s0, partial),
        "same": kept.argmax == whole.argmax and kept.sample == whole.sample,
        "d_logp": float((kept.log_marginals[likely] - whole_lm[likely]).abs().max()),
        "d_entropy": float((kept.entropy - whole.entropy).abs().max()),
    }


def demo_steps() -> list[tuple[CompiledGrammar, torch.Tensor, int, bool]]:
    """The bundled demo model's steps on four requests: (grammar, logits, state, partial)."""
    from agentloop.builtin import card_options, demo_agent

    caught: list[tuple[CompiledGrammar, torch.Tensor, int, bool]] = []
    step = CompiledGrammar.denoise_step

    def record(self: CompiledGrammar, logits: Any, generator: Any = None, state: Any = None, partial: bool = False,
               out: Any = None, prune: bool = True) -> Any:
        caught.append((self, logits.detach().clone(), self.start_state if state is None else int(state), partial))
        return step(self, logits, generator, state=state, partial=partial, out=out, prune=prune)

    CompiledGrammar.denoise_step = record  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as sandbox:
            os.environ["AGENTLOOP_SANDBOX"] = sandbox
            agent = demo_agent(options=card_options(seed=0))
            for prompt in ("What's the weather in Lisbon for 3 days?", "What is 12 mi in km?",
                           "What time is it in Tokyo?", "Convert 5 kg to lb"):
                agent.run_sync(prompt)
    finally:
        CompiledGrammar.denoise_step = step  # type: ignore[method-assign]
    return caught


def markdown(rows: list[dict[str, Any]], demo: list[dict[str, Any]], command: str, threads: int) -> str:
    lines = [*step_bench_header("Pruning: the step over the cells that carry weight, against the whole lattice",
                                command, f"{threads} torch/numba thread(s)"), "",
             "`denoise_step`, medians, the two alternating; kept: the share of the support's (position, state) "
             "cells the step ran on (100%: pruning gave up); same: Viterbi canvas and sample equal; "
             "|d log p|: the largest difference of the log-marginals the whole lattice puts above -30; "
             "|d H|: of the entropies. 'call +12': a valid call's tokens 12 nats ahead of N(0, 2) noise.", "",
             "| tokenizer | tools | states | logits | whole ms | pruned ms | ratio | kept | same | |d log p| | |d H| |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['tools']} | {r['states']} | {r['logits']} | {r['whole_ms']:.2f} | "
                     f"{r['pruned_ms']:.2f} | {r['pruned_ms'] / r['whole_ms']:.2f}x | {r['kept']:.2%} | "
                     f"{'yes' if r['same'] else 'NO'} | {r['d_logp']:.1e} | {r['d_entropy']:.1e} |")
    if demo:
        whole = sum(d["whole_ms"] for d in demo)
        pruned = sum(d["pruned_ms"] for d in demo)
        kept = [d["kept"] for d in demo]
        lines += ["", f"## The demo model's own steps ({len(demo)} steps of four requests, L=64, replayed)", "",
                  f"Steps in all: whole {whole:.1f} ms, pruned {pruned:.1f} ms ({pruned / whole:.2f}x); "
                  f"kept {min(kept):.2%}-{max(kept):.2%} of the cells (median {statistics.median(kept):.2%}); "
                  f"Viterbi canvas and sample the same in {sum(d['same'] for d in demo)} of {len(demo)}; "
                  f"largest |d log p| {max(d['d_logp'] for d in demo):.1e}, |d H| "
                  f"{max(d['d_entropy'] for d in demo):.1e}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_bench_options(ap, 7, REPO / "bench/results/pruning.md")
    ap.add_argument("--demo", action="store_true", help="also replay the demo model's steps")
    args = ap.parse_args(argv)
    step_bench_threads(args.threads)
    tok, aliases = LOADERS[args.tokenizer]()
    rows = []
    for n in args.tools:
        g = compile_tools(tool_schemas(args.tokenizer)[:n], tok, wire_format="gemma4", aliases=aliases)
        for kind, x in logit_kinds(g, tok, args.length).items():
            r = {"tokenizer": args.tokenizer, "tools": n, "states": g.stats.dfa_states, "logits": kind,
                 **compare(g, x, args.repeats)}
            rows.append(r)
            print(f"{args.tokenizer} x {n} tools, {kind}: whole {r['whole_ms']:.2f} ms, pruned {r['pruned_ms']:.2f} ms, "
                  f"kept {r['kept']:.2%}, same {r['same']}, |d log p| {r['d_logp']:.1e}", flush=True)
    demo = []
    if args.demo:
        for g, x, s0, partial in demo_steps():
            demo.append(compare(g, x, args.repeats, s0, partial))
        print(f"demo: {len(demo)} steps, whole {sum(d['whole_ms'] for d in demo):.1f} ms, "
              f"pruned {sum(d['pruned_ms'] for d in demo):.1f} ms", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, demo, step_bench_command("pruning.py", argv), args.threads))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
