"""A/B of the token automaton build (symbol DFA x vocabulary -> atoms, groups, edges):
the working tree against a baseline commit, side by side in one process.

For each tokenizer and tool set, the grammar is compiled once (the on-disk cache off) to
get the symbol DFA and the vocabulary that ``build_token_automaton`` receives; then both
versions' ``build_token_automaton`` run on exactly those, in turns, and their automata
are compared array for array (an optimisation of the build must not change what it
builds). The baseline is exported with ``git archive`` as in ``bench/constraint_ab.py``.

    python bench/token_automaton_ab.py --baseline 3ad4e4b
    python bench/token_automaton_ab.py --baseline HEAD~1 --tokenizers gemma3-262k --tools 20 --repeats 1

Writes ``bench/results/token_automaton_ab.md`` (``--out`` to change); medians of the
repeats, seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import numpy as np  # noqa: E402

import agentloop.grammar as G  # noqa: E402
from bench.constraint import clear_grammar_caches  # noqa: E402
from bench.constraint_ab import (export_baseline, report_header, revisions, table_lines,  # noqa: E402
                                 write_report)
from bench.tokenizers_offline import LOADERS, SCHEMAS  # noqa: E402

#: What a build returns, compared between the two versions.
FIELDS = ("n_states", "start", "accept", "atom_of_token", "atom_tokens", "atom_offsets", "group_atoms",
          "group_offsets", "atom_groups", "atom_group_offsets", "edge_src", "edge_dst", "edge_group", "src_offsets")
#: What must be equal to the bit whatever the atoms' and groups' numbering.
STATE_FIELDS = ("n_states", "start", "accept", "edge_src", "edge_dst", "src_offsets")


def build_inputs(tools: list[dict[str, Any]], tok: Any, aliases: dict[str, str]) -> tuple[Any, Any]:
    """The (symbol DFA, vocabulary) that compiling ``tools`` hands to build_token_automaton."""
    seen: list[tuple[Any, Any]] = []
    build = G.build_token_automaton

    def spy(dfa: Any, vocab: Any) -> Any:
        seen.append((dfa, vocab))
        return build(dfa, vocab)

    G.build_token_automaton = spy  # compile_tools looks it up in agentloop.grammar's namespace
    try:
        clear_grammar_caches()
        G.compile_tools(tools, tok, "gemma4", aliases=aliases)
    finally:
        G.build_token_automaton = build
    if not seen:
        raise RuntimeError("compile_tools did not build a token automaton (cached?)")
    return seen[-1]


def same_automaton(a: Any, b: Any) -> str:
    """The verdict: "same" where every array is equal; "relabelled" where the two differ
    only in how the atoms and the groups are numbered (the same partition of the vocabulary into
    atoms, the same edges, each edge with the same set of tokens: since session 18 atoms
    are numbered by their first token, where earlier builds numbered them by hash
    value); "different" otherwise."""
    if all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in FIELDS):
        return "same"
    if not all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in STATE_FIELDS):
        return "different"
    allowed = a.atom_of_token >= 0
    if not np.array_equal(allowed, b.atom_of_token >= 0):
        return "different"
    pairs = np.unique(np.stack([a.atom_of_token[allowed], b.atom_of_token[allowed]], axis=1), axis=0)
    if not (len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1])) == a.atom_offsets.size - 1):
        return "different"  # not a one-to-one map of atoms
    to_b = np.empty(len(pairs), np.int64)
    to_b[pairs[:, 0]] = pairs[:, 1]
    groups = np.unique(np.stack([a.edge_group, b.edge_group], axis=1), axis=0)  # edges are in the same order
    if not len(np.unique(groups[:, 0])) == len(groups) == len(np.unique(groups[:, 1])):
        return "different"
    for ga, gb in groups.tolist():
        mapped = np.sort(to_b[a.group_atoms[a.group_offsets[ga]:a.group_offsets[ga + 1]]])
        if not np.array_equal(mapped, np.sort(b.group_atoms[b.group_offsets[gb]:b.group_offsets[gb + 1]])):
            return "different"
    return "relabelled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare the working tree against")
    parser.add_argument("--tokenizers", default="bpe-4k,wordpiece-30k,gemma3-262k")
    parser.add_argument("--tools", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--repeats", type=int, default=3, help="builds per version (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="numba threads (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "token_automaton_ab.md")
    args = parser.parse_args()
    os.environ["AGENTLOOP_CACHE_DIR"] = "off"
    numba.set_num_threads(args.threads)

    rev, head, dirty = revisions(args.baseline)
    schemas = json.loads(SCHEMAS.read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = export_baseline(rev, Path(tmp))
        base_build = importlib.import_module(baseline.__name__ + ".token_automaton").build_token_automaton
        for name in args.tokenizers.split(","):
            tok, aliases = LOADERS[name]()
            for n in args.tools:
                dfa, vocab = build_inputs(schemas[:n], tok, aliases)
                times: dict[str, list[float]] = {"baseline": [], "current": []}
                built = {}
                if not rows:  # the first build of each version compiles its numba kernels: not timed
                    base_build(dfa, vocab)
                    G.build_token_automaton(dfa, vocab)
                for _ in range(args.repeats):
                    for which, build in (("baseline", base_build), ("current", G.build_token_automaton)):
                        t0 = time.perf_counter()
                        built[which] = build(dfa, vocab)
                        times[which].append(time.perf_counter() - t0)
                same = same_automaton(built["baseline"], built["current"])
                b, c = statistics.median(times["baseline"]), statistics.median(times["current"])
                rows.append((name, n, dfa.n_states, vocab.size, b, c, same))
                print(f"{name} x {n} tools: baseline {b:.2f} s, current {c:.2f} s, {c / b:.2f}x, "
                      f"{'AUTOMATA DIFFER' if same == 'different' else same + ' automaton'}", flush=True)
    command = "python bench/token_automaton_ab.py " + " ".join(sys.argv[1:])
    lines = report_header("Token automaton build A/B", command,
                          f"{args.threads} numba thread{'s' if args.threads > 1 else ''}; "
                          f"Python {platform.python_version()}, numpy {np.__version__}", head, dirty, rev) + [
             f"``build_token_automaton`` on the same symbol DFA and vocabulary (gemma4 wire format), the two versions "
             f"in turns, medians of {args.repeats} (after one untimed build of each, which compiles its kernels); "
             "'same': every array of the two automata equal; 'relabelled': equal but for the numbering of atoms and "
             "groups (the same atoms, edges and token sets).", ""]
    lines += table_lines(["tokenizer", "tools", "DFA states", "V", "baseline s", "current s", "current / baseline",
                          "same"],
                         [[*r[:4], f"{r[4]:.2f}", f"{r[5]:.2f}", f"{r[5] / r[4]:.2f}",
                           "**no**" if r[6] == "different" else r[6]] for r in rows])
    write_report(args.out, lines)
    if any(r[6] == "different" for r in rows):
        raise SystemExit("the two versions built different automata")


if __name__ == "__main__":
    main()
