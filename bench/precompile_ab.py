"""Two kernel recordings side by side: what ``agentloop precompile`` compiles, and what is left.

``agentloop.precompile`` compiles the numba kernels recorded in
``agentloop/data/kernel_signatures.json`` before their first calls; a kernel or
signature the recording lacks compiles in the middle of a run instead. This times, for
a baseline recording (a git revision's file) and the working tree's, with the working
tree's code: a fresh install's ``agentloop precompile --demo-only`` (what a first demo
runs), then ``agentloop precompile`` (the rest), then, in a new process, the first step of
each case below (a text answer where a call is forced: the steps whose weight leaves
float64's range) and the seconds it spent compiling. Each round runs both recordings in
turn, each with numba's and agentloop's caches in folders that start empty.

    python bench/precompile_ab.py --baseline HEAD~1
    python bench/precompile_ab.py --baseline 4101a91 --rounds 2 --out bench/results/precompile_ab.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numba  # noqa: E402

from agentloop.precompile import kernel_count, recorded_kernels  # noqa: E402
from bench.constraint_ab import revisions, table_lines, write_report  # noqa: E402
from bench.first_run import COMPILE_CLOCK  # noqa: E402

#: The first steps timed after the precompile: (tools, temperature), byte tokenizer.
CASES = (("demo tools", 0.2), ("5 tools", 0.2), ("3 tools", 1.0))

#: ``agentloop precompile`` (argv[2:]) against the recording argv[1], timed in its process.
PRECOMPILE = r"""
import sys, time
from pathlib import Path
import agentloop.precompile as pc
from click.testing import CliRunner
from agentloop.cli import main
pc.SIGNATURES_FILE = Path(sys.argv[1])
t = time.perf_counter()
r = CliRunner().invoke(main, ["precompile", *sys.argv[2:]])
assert r.exit_code == 0, r.output
print(time.perf_counter() - t)
"""

#: The first step of each case, with the seconds it spent compiling (nested compiles once).
STEPS = COMPILE_CLOCK + r"""
import json, sys
import agentloop.precompile as pc
from agentloop.cli import DEMO_TOOLS
from agentloop.grammar import byte_tokenizer, compile_tools
tok = byte_tokenizer()
schemas = json.loads((pc.SIGNATURES_FILE.parent / "tool_schemas.json").read_text())
tools = {"demo tools": DEMO_TOOLS, "5 tools": schemas[:5], "3 tools": schemas[:3]}
out = {}
for name, temperature in json.loads(sys.argv[1]):
    g = compile_tools(tools[name], tok, "gemma4")
    args = pc._text_where_call(g, tok, temperature)
    top.clear()
    t = time.perf_counter()
    g.denoise_step(**args)
    out[f"{name}, T={temperature:g}"] = (time.perf_counter() - t, sum(top.values()))
print(json.dumps(out))
"""


def run(code: str, caches: Path, *args: str) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(caches / "numba"), "AGENTLOOP_CACHE_DIR": str(caches / "grammars")}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def one_install(recording: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        caches = Path(tmp)
        res = {"precompile --demo-only": float(run(PRECOMPILE, caches, str(recording), "--demo-only")),
               "precompile (the rest)": float(run(PRECOMPILE, caches, str(recording)))}
        for case, (wall, compiling) in json.loads(run(STEPS, caches, json.dumps(CASES))).items():
            res[f"first step: {case}"] = wall
            res[f"  of it compiling: {case}"] = compiling
    return res


def signature_counts(recording: Path) -> str:
    """"N signatures (M for the demo) of K kernels" for a recording."""
    kernels = recorded_kernels(recording)
    return (f"{sum(len(k.signatures) for k in kernels)} signatures "
            f"({sum(len(k.signatures) for k in kernels if k.demo)} for the demo) of {kernel_count(kernels)} kernels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision whose recording is the baseline")
    parser.add_argument("--rounds", type=int, default=1, help="fresh installs per recording")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precompile_ab.md")
    args = parser.parse_args()
    base, head, dirty = revisions(args.baseline)
    recording = "agentloop/data/kernel_signatures.json"
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline.json"
        baseline.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{args.baseline}:{recording}"],
                                           check=True, capture_output=True, text=True).stdout)
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for i in range(args.rounds):
            for name, path in (("baseline", baseline), ("current", REPO / recording)):
                runs[name].append(one_install(path))
                print(f"round {i + 1}, {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[name][-1].items()),
                      flush=True)
        sizes = {name: signature_counts(path) for name, path in (("baseline", baseline), ("current", REPO / recording))}
    rows = []
    for key in runs["baseline"][0]:
        b, c = (statistics.median(r[key] for r in runs[name]) for name in ("baseline", "current"))
        rows.append([key, f"{b:.2f}", f"{c:.2f}", f"{c / b:.2f}" if b >= 0.05 else "-"])
    command = f"python bench/precompile_ab.py --baseline {args.baseline}" + (
        f" --rounds {args.rounds}" if args.rounds != 1 else "")
    lines = ["# Kernel recordings side by side", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; Python "
             f"{platform.python_version()}, numba {numba.__version__}  ",
             f"Code: agentloop at {head}{' + uncommitted changes' if dirty else ''}; baseline recording: {base}'s "
             f"`{recording}`, current: the working tree's  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}; load average (1 min) at the end {os.getloadavg()[0]:.2f}",
             "", f"Baseline: {sizes['baseline']}; current: {sizes['current']}.",
             "", f"Seconds, medians of {args.rounds} fresh install(s) per recording, the two in turn; the working "
             f"tree's code in both. Precompiles in {os.cpu_count()} processes. First step: a text answer 30 nats "
             "ahead where the canvas continues a call (byte tokenizer), in a new process after both precompiles.", ""]
    lines += table_lines(["", "baseline s", "current s", "ratio"], rows)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
