"""A fresh install's first ``agentloop demo`` against its second: what numba's compiles cost.

The kernels of the constraint, the engine and the grammar compiler are numba functions,
compiled for the machine's CPU and kept in numba's disk cache. A first demo compiles
those it calls before it starts, shared out over one process per CPU
(``agentloop.precompile``); without that, each compiles at its first call, one after
another ("serial" below, the demo's first run before session 38). Each run here is a new
process running the demo (the bundled model, three requests) with numba's cache and
agentloop's grammar cache pointed at folders that start empty, as on a fresh install; the
second run reuses the parallel first run's. Reported: wall time, the seconds spent
compiling in the demo's own process (numba's compile events, nested compiles counted
once), the parallel compile's wall time, and the kernels that took longest in the serial
run, each with the compiles it set off.

    python bench/first_run.py
    python bench/first_run.py --rounds 2 --out bench/results/first_run.md
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

from bench.constraint_ab import revisions, table_lines, write_report  # noqa: E402

#: In a child script: ``top`` gathers the seconds of numba's outermost compiles from here on.
COMPILE_CLOCK = r"""
import time
from numba.core import event
top = {}  # outermost compiles: kernel -> seconds, with the compiles it set off
stack = []
class Clock(event.Listener):
    def on_start(self, ev):
        stack.append(time.perf_counter())
    def on_end(self, ev):
        dt = time.perf_counter() - stack.pop()
        if not stack:
            f = ev.data["dispatcher"].py_func
            name = f"{f.__module__}.{f.__qualname__}".replace(".<locals>", "")
            top[name] = top.get(name, 0.0) + dt
event.register("numba:compile", Clock())
"""

#: One run of the demo, timed inside its own process.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
""" + COMPILE_CLOCK + r"""
from click.testing import CliRunner
import agentloop.cli
from agentloop.cli import main
precompile = agentloop.cli._precompile
spent = []
def timed(*a, **k):
    t = time.perf_counter()
    if sys.argv[1] == "parallel":
        precompile(*a, **k)
    spent.append(time.perf_counter() - t)
agentloop.cli._precompile = timed  # (serial: none; each kernel compiles at its first call)
r = CliRunner().invoke(main, ["demo"])
assert r.exit_code == 0, r.output
print(json.dumps({"wall_s": time.perf_counter() - t0, "compile_s": sum(top.values()), "kernels": top,
                  "precompile_s": sum(spent)}))
"""


def one_run(numba_dir: str, grammar_dir: str, mode: str = "parallel") -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": numba_dir, "AGENTLOOP_CACHE_DIR": grammar_dir}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0  # (with the interpreter's start)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="fresh installs to time (each: a first and a second run)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "first_run.md")
    args = parser.parse_args()
    _, head, dirty = revisions("HEAD")  # (before the runs: without git it fails at once)
    serials, firsts, seconds = [], [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as numba_dir, tempfile.TemporaryDirectory() as grammar_dir:
            serials.append(one_run(numba_dir, grammar_dir, "serial"))
        with tempfile.TemporaryDirectory() as numba_dir, tempfile.TemporaryDirectory() as grammar_dir:
            firsts.append(one_run(numba_dir, grammar_dir))
            seconds.append(one_run(numba_dir, grammar_dir))
        print(f"round {i + 1}: first run serial {serials[-1]['process_s']:.1f} s, parallel "
              f"{firsts[-1]['process_s']:.1f} s ({firsts[-1]['precompile_s']:.1f} s precompiling), second "
              f"{seconds[-1]['process_s']:.1f} s ({seconds[-1]['compile_s']:.1f} s compiling)", flush=True)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    command = "python bench/first_run.py" + (f" --rounds {args.rounds}" if args.rounds != 1 else "")
    lines = ["# First run of `agentloop demo`", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; Python "
             f"{platform.python_version()}, numba {numba.__version__}  ",
             f"Code: agentloop at {head}{' + uncommitted changes' if dirty else ''}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}; load average (1 min) at the end {os.getloadavg()[0]:.2f}",
             "", f"Each run a new process with numba's and agentloop's caches in folders that start empty (first) "
              f"or hold what the parallel first run left (second); medians of {args.rounds} round(s). Serial: each "
              "kernel compiled at its first call (the precompile skipped); parallel: the demo as shipped, its "
              f"kernels compiled first in {os.cpu_count()} processes. Compiling: numba's compile events in the demo's "
              "process, nested ones counted once (the parallel run's other processes not counted); precompile: the "
              "parallel compile's wall time.", ""]
    lines += table_lines(["run", "process s", "demo s (in the process)", "compiling s (this process)", "precompile s"],
                         [[name, f"{med(runs, 'process_s'):.1f}", f"{med(runs, 'wall_s'):.1f}",
                           f"{med(runs, 'compile_s'):.1f}", f"{med(runs, 'precompile_s'):.1f}"]
                          for name, runs in (("first, serial", serials), ("first, parallel", firsts),
                                             ("second", seconds))])
    lines += ["", f"First run, parallel against serial: {med(firsts, 'process_s') / med(serials, 'process_s'):.2f}x "
              "the wall time (ratio of medians)."]
    kernels = serials[0]["kernels"]
    lines += ["", f"The serial first run's longest compiles (round 1; a kernel's time includes the compiles it set off, "
              f"{len(kernels)} kernels in all):", ""]
    lines += table_lines(["kernel", "s"], [[f"`{k}`", f"{v:.2f}"] for k, v in
                                          sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]])
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
