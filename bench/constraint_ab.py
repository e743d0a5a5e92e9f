"""A/B of the per-step canvas constraint: the working tree against a baseline commit,
side by side in one process.

On a shared, noisy machine two separate runs of ``bench/constraint.py`` can differ by 2x
for the same code. Here both versions load into one process (the baseline's
``agentloop/`` exported with ``git archive`` and imported as ``agentloop_baseline``) and
their calls alternate, so that both see the same load; the ratio of medians is what to
quote. The two versions' outputs are compared too: Viterbi canvases must be equal and
marginals agree to float32 rounding (samples may differ where float sums were
reassociated).

    python bench/constraint_ab.py --baseline 8a6fe74            # 1, 5 and 20 tools, BPE 4k
    python bench/constraint_ab.py --baseline HEAD~1 --tools 1 --repeats 40
    python bench/constraint_ab.py --baseline HEAD~1 --threads 2 --out bench/results/constraint_ab_2threads.md
    python bench/constraint_ab.py --baseline HEAD~1 --peak 80   # one token per row far ahead, as a trained model's
    python bench/constraint_ab.py --baseline HEAD~1 --tokenizer byte --tools 20 --logit-std 0.25   # flat logits
    python bench/constraint_ab.py --baseline HEAD~1 --after-forward   # each call right after a decoder forward
    python bench/constraint_ab.py --baseline HEAD~1 --device cuda --tokenizer gemma3-262k   # the GPU step
    python bench/constraint_ab.py --baseline HEAD~1 --tools 20 --force-first 1000   # a call forced at position 0
    python bench/constraint_ab.py --baseline HEAD~1 --text-where-call 30 --temperature 0.2   # a call the model refuses
    python bench/constraint_ab.py --baseline HEAD~1 --overruled 120   # a sure call, 10 of its tokens overruled
    python bench/constraint_ab.py --baseline HEAD~1 --batch 4   # (4, L, V) logits: the batched API

The default logits are N(0, 3): ~15 nats from a row's best to most of its tokens. A
trained model's are far wider: the bundled model's rows span ~100 nats at its sampling
temperatures (0.4-0.8), one token or a few far ahead of the rest, so most atoms sit tens
of nats below the row's best. A change whose cost depends on the logits must be measured
with ``--peak 80`` too (one such, an exp reference per row instead of per atom, was
0.7-0.9x the scan on the default logits, 1.0-1.05x on N(0, 12) and 2x on the model's own).

Writes ``bench/results/constraint_ab.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import bench.fresh_kernels  # noqa: E402,F401  (before agentloop: see its docstring)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import agentloop.grammar as current  # noqa: E402
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

#: The issue's three tokenizers, and the byte tokenizer of the engine's random-weight
#: models (the loop benchmark's), whose flat logits (``--logit-std 0.25``) make pruning
#: keep ~5% of a 20-tool lattice, a million cells.
TOKENIZERS = {**LOADERS, "byte": lambda: (current.byte_tokenizer(), {})}

BASELINE_PACKAGE = "agentloop_baseline"


def export_baseline(rev: str, into: Path) -> Any:
    """The baseline's ``agentloop.grammar``, imported from ``into`` under another name.
    ``rev`` is a git revision, or a folder holding an exported ``agentloop/`` and
    ``grammars/`` (``git archive REV agentloop grammars``; for a machine whose copy of the
    repository has no history)."""
    if Path(rev).is_dir():
        for part in ("agentloop", "grammars"):
            shutil.copytree(Path(rev) / part, into / part)
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "agentloop", "grammars"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "agentloop").rename(into / BASELINE_PACKAGE)
    for path in (into / BASELINE_PACKAGE).rglob("*.py"):  # absolute self-imports would load the working tree
        text = path.read_text()
        fixed = re.sub(r"\b(from|import) agentloop\b", rf"\1 {BASELINE_PACKAGE}", text)
        if fixed != text:
            path.write_text(fixed)
    sys.path.insert(0, str(into))
    module = importlib.import_module(f"{BASELINE_PACKAGE}.grammar")
    assert Path(module.__file__).is_relative_to(into), module.__file__
    return module


def revisions(baseline: str) -> tuple[str, str, bool]:
    """(the baseline's short hash, HEAD's, whether agentloop/ has uncommitted changes); a
    baseline folder is named by its path, and without git HEAD reads "?" and clean."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], check=True, capture_output=True, text=True).stdout.strip()

    rev = baseline if Path(baseline).is_dir() else git("rev-parse", "--short", baseline)
    try:
        return rev, git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "agentloop"))
    except (OSError, subprocess.CalledProcessError):
        return rev, "?", False


def report_header(title: str, command: str, software: str, head: str, dirty: bool, rev: str) -> list[str]:
    """An A/B report's first lines: the command, the machine, both versions, the date."""
    return [f"# {title}", "",
            f"Command: `{command}`  ",
            f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, {software}  ",
            f"Current: agentloop at {head}{' + uncommitted changes' if dirty else ''}; baseline: {rev}  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}; load average (1 min) at the end {os.getloadavg()[0]:.2f}",
            ""]


def table_lines(columns: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_report(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def timed_pair(ops: dict[str, Callable[[], Any]], repeats: int,
               before: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each op, the ops called in turn ``repeats`` times (after one
    warm-up each), ``before`` run untimed ahead of every call."""
    for op in ops.values():
        op()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - t0)
    return times


#: The call ``--overruled`` makes the model sure of (padded to the canvas).
CALL = '<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>,days:3}<tool_call|><|tool_response>'
#: What the model would answer where ``--text-where-call`` forces a call instead.
TEXT_ANSWER = "I cannot look that up right now, but Lisbon is usually mild and sunny at this time of year."


def compare(tok_name: str, n_tools: int, baseline: Any, repeats: int, logit_std: float, peak: float,
            after_forward: bool, device: str = "cpu", seed: int = 0, force_first: float = 0.0,
            text_where_call: float = 0.0, temperature: float = 1.0, overruled: float = 0.0,
            batch: int = 1) -> list[dict[str, Any]]:
    tok, aliases = TOKENIZERS[tok_name]()
    tools = tool_schemas(tok_name)[:n_tools]
    grammars = {"baseline": baseline.compile_tools(tools, tok, "gemma4", aliases=aliases),
                "current": current.compile_tools(tools, tok, "gemma4", aliases=aliases)}
    V, L = tok.get_vocab_size(), 256
    gen = torch.Generator().manual_seed(seed)

    def one_canvas() -> torch.Tensor:
        logits = torch.randn(L, V, generator=gen) * logit_std  # (L, V)
        if peak:  # one token per row that far above the row's best
            ahead = torch.randint(0, V, (L,), generator=gen)
            logits[torch.arange(L), ahead] = logits.max(dim=1).values + peak
        if force_first:  # a call's first token that far above the rest at the first position
            logits[0, tok.token_to_id("<|tool_call>")] = logits[0].max() + force_first
        if text_where_call:  # a sure text answer, where the canvas continues a call (the grammar forbids the text)
            ids = tok.encode(TEXT_ANSWER, add_special_tokens=False).ids[:L]
            logits[torch.arange(len(ids)), torch.tensor(ids)] = logits[:len(ids)].max(dim=1).values + text_where_call
        if overruled:  # a sure valid call, and at 10 positions a token ahead of it that the grammar forbids there
            ids = tok.encode(CALL, add_special_tokens=False).ids
            call = torch.tensor(ids + [grammars["current"].vocab.pad_id] * (L - len(ids)))
            logits[torch.arange(L), call] = logits.max(dim=1).values + overruled
            rows = torch.randperm(L, generator=gen)[:10]
            logits[rows, torch.randint(0, V, (10,), generator=gen)] = logits[rows].max(dim=1).values + overruled
        return logits / temperature

    # (L, V), or (batch, L, V): further canvases drawn alike
    logits = one_canvas() if batch == 1 else torch.stack([one_canvas() for _ in range(batch)])
    state: dict[str, Any] = {}
    if text_where_call:
        opened = tok.encode("<|tool_call>", add_special_tokens=False).ids
        state = {k: {"state": g.state_after(opened) if batch == 1 else [g.state_after(opened)] * batch}
                 for k, g in grammars.items()}
    logits = logits.to(device)  # on a GPU the vocabulary passes run there, the DP on the host
    before = None
    if after_forward:  # as the engine calls a step: right after the model's forward wrote the logits
        from bench.constraint import Config, decoder_forward

        forward, _ = decoder_forward(V, Config())
        fresh = logits.clone()

        def before() -> None:
            forward()
            logits.copy_(fresh)

    step_out = torch.empty_like(logits)  # the engine's self-conditioning buffer

    def synced(op: Callable[[], Any]) -> Callable[[], Any]:
        if device == "cpu":
            return op
        return lambda: (op(), torch.cuda.synchronize())  # the device's queue drained: its work is in the time

    def first_state(at: dict[str, Any], g: Any) -> int:
        st = at.get("state", g.start_state)
        return st[0] if isinstance(st, list) else st

    def ops_of(g: Any, at: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        out = {"out": step_out} if "out" in inspect.signature(g.denoise_step).parameters else {}  # older baselines
        return {"viterbi": synced(lambda: g.viterbi(logits, **at)),
                "sample": synced(lambda: g.sample(logits, torch.Generator().manual_seed(seed), **at)),
                "marginals": synced(lambda: g.marginals(logits, return_entropy=True, **at)),
                "denoise_step": synced(lambda: g.denoise_step(logits, torch.Generator().manual_seed(seed), **out,
                                                              **at)),
                # the same over the whole lattice (grammar/pruning.py keeps a few cells by default)
                "denoise_step_whole": synced(lambda: g.denoise_step(logits, torch.Generator().manual_seed(seed),
                                                                    prune=False, **out, **at)),
                # once per canvas: the live states at each position (a new canvas, a new start state)
                "support": lambda: (g._support_cache.clear(), g._support(L, first_state(at, g), False))}

    b_out, c_out = (grammars[k].viterbi(logits, **state.get(k, {})) for k in ("baseline", "current"))
    assert b_out == c_out, f"{tok_name} x {n_tools} tools: the Viterbi canvases differ"
    b_m, c_m = (grammars[k].marginals(logits, **state.get(k, {})) for k in ("baseline", "current"))
    finite = torch.isfinite(b_m)
    # a token whose posterior lies near float64's underflow may be 0 in one pass and not
    # in the other (dense and live-list passes scale their messages differently); with
    # pruning (grammar/pruning.py) so may any below 2**-56 of the total
    pruned = any("prune" in inspect.signature(g.marginals).parameters for g in grammars.values())
    tiny = torch.where(finite, b_m, c_m) < (math.log(2.0**-56) if pruned else -700)
    assert torch.equal(finite | tiny, torch.isfinite(c_m) | tiny), "the marginals' supports differ"
    assert torch.allclose(torch.exp(b_m[finite]), torch.exp(c_m[finite]), atol=1e-6), "the marginals differ"
    rows = []
    whole = ("denoise_step_whole",) if all("prune" in inspect.signature(g.denoise_step).parameters
                                             for g in grammars.values()) else ()
    for op in ("viterbi", "sample", "marginals", "denoise_step", *whole, "support"):
        times = timed_pair({k: ops_of(g, state.get(k, {}))[op] for k, g in grammars.items()}, repeats, before)
        base, cur = (statistics.median(times[k]) * 1e3 for k in ("baseline", "current"))
        rows.append({"tokenizer": tok_name, "tools": n_tools, "op": op, "baseline_ms": base, "current_ms": cur,
                     "ratio": cur / base})
        print(f"{tok_name} x {n_tools} tools {op:12s} baseline {base:8.2f} ms  current {cur:8.2f} ms  "
              f"current/baseline {cur / base:5.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True,
                        help="git revision to compare the working tree against, or a folder holding its agentloop/ "
                             "and grammars/")
    parser.add_argument("--tokenizer", default="bpe-4k", choices=sorted(TOKENIZERS))
    parser.add_argument("--tools", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--repeats", type=int, default=0, help="calls per op and version (default: 30, 5 at 20 tools)")
    parser.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    parser.add_argument("--logit-std", type=float, default=3.0,
                        help="standard deviation of the random logits (default 3)")
    parser.add_argument("--peak", type=float, default=0.0,
                        help="raise one random token per row this many nats above the row's best (default 0: "
                             "none; 80 is like a trained model's confident rows)")
    parser.add_argument("--force-first", type=float, default=0.0,
                        help="raise the call's first token (<|tool_call>) at the first position this many nats above "
                             "the row's best (default 0: none; from ~710 the row's other sums underflow)")
    parser.add_argument("--text-where-call", type=float, default=0.0, metavar="LEAD",
                        help="the model sure of a text answer (its tokens LEAD nats ahead), where the canvas continues "
                             "a call from <|tool_call> (default 0: none)")
    parser.add_argument("--overruled", type=float, default=0.0, metavar="LEAD",
                        help="the model sure of a valid call (its tokens LEAD nats ahead), with a random token LEAD "
                             "ahead of that at 10 positions (default 0: none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (default 1)")
    parser.add_argument("--batch", type=int, default=1,
                        help="canvases per call, each drawn alike (default 1: (L, V) logits; else (B, L, V))")
    parser.add_argument("--after-forward", action="store_true",
                        help="run the tiny model's decoder forward (bench/constraint.py's) before every timed call")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the logits are (default cpu; cuda: the vocabulary passes run on the GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "constraint_ab.md")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be 1 or more, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.device == "cuda" and args.after_forward:
        parser.error("--after-forward runs the tiny model's forward on the CPU; it does not combine with --device cuda")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rev, head, dirty = revisions(args.baseline)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = export_baseline(rev, Path(tmp))
        for n in args.tools:
            rows += compare(args.tokenizer, n, baseline, args.repeats or (30 if n < 20 else 5), args.logit_std,
                            args.peak, args.after_forward, args.device, force_first=args.force_first,
                            text_where_call=args.text_where_call, temperature=args.temperature,
                            overruled=args.overruled, batch=args.batch)
    command = "python bench/constraint_ab.py " + " ".join(sys.argv[1:])
    peaked = f", one token per row {args.peak:g} nats ahead" if args.peak else ""
    if args.force_first:
        peaked += f", `<|tool_call>` {args.force_first:g} nats ahead at the first position"
    if args.text_where_call:
        peaked += (f", a text answer {args.text_where_call:g} nats ahead where the canvas continues a call from "
                   "`<|tool_call>`")
    if args.overruled:
        peaked += (f", a valid call {args.overruled:g} nats ahead with a random token that far ahead of it at 10 "
                   "positions")
    if args.temperature != 1.0:
        peaked += f", divided by a temperature of {args.temperature:g}"
    lines = report_header("Canvas constraint A/B", command,
                          f"{args.threads} torch/numba thread{'s' if args.threads > 1 else ''}; "
                          f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
                          + (f"; logits on {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
                          head, dirty, rev) + [
             "Both versions in one process, their calls alternating; L=256, "
             f"{f'batches of {args.batch} canvases (support: one canvas), ' if args.batch > 1 else ''}random logits "
             f"(N(0, {args.logit_std:g}){peaked}), gemma4 wire "
             f"format; {'each call right after a decoder forward; ' if args.after_forward else ''}"
             "denoise_step writes into a reused out buffer, as the engine's does; medians. Viterbi canvases equal "
             "and marginals equal to 1e-6 between the two (checked).", ""]
    lines += table_lines(["tokenizer", "tools", "op", "baseline ms", "current ms", "current / baseline"],
                         [[r["tokenizer"], r["tools"], r["op"], f"{r['baseline_ms']:.2f}", f"{r['current_ms']:.2f}",
                           f"{r['ratio']:.2f}"] for r in rows])
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
