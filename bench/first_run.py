"""A fresh install's first ``agentloop demo`` against its second: what numba's compiles cost.

The kernels of the constraint, the engine and the grammar compiler are numba functions,
compiled for the machine's CPU at their first call and kept in numba's disk cache. A
first run pays for all of those it calls. Each run here is a new process running the
demo (the bundled model, three requests) with numba's cache and agentloop's grammar cache
pointed at folders that start empty, as on a fresh install; the second run reuses them.
Reported: wall time, the seconds spent compiling (numba's compile events, nested compiles
counted once), and the kernels that took longest, each with the compiles it set off.

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

#: One run of the demo, timed inside its own process.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
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
from click.testing import CliRunner
from agentloop.cli import main
r = CliRunner().invoke(main, ["demo"])
assert r.exit_code == 0, r.output
print(json.dumps({"wall_s": time.perf_counter() - t0, "compile_s": sum(top.values()), "kernels": top}))
"""


def one_run(numba_dir: str, grammar_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": numba_dir, "AGENTLOOP_CACHE_DIR": grammar_dir}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, check=True)
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
    firsts, seconds = [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as numba_dir, tempfile.TemporaryDirectory() as grammar_dir:
            firsts.append(one_run(numba_dir, grammar_dir))
            seconds.append(one_run(numba_dir, grammar_dir))
        print(f"round {i + 1}: first run {firsts[-1]['process_s']:.1f} s ({firsts[-1]['compile_s']:.1f} s compiling), "
              f"second {seconds[-1]['process_s']:.1f} s ({seconds[-1]['compile_s']:.1f} s compiling)", flush=True)

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
              f"or hold what the first left (second); medians of {args.rounds} round(s). Compile: numba's compile "
              "events, nested ones counted once.", ""]
    lines += table_lines(["run", "process s", "demo s (in the process)", "compiling s"],
                         [[name, f"{med(runs, 'process_s'):.1f}", f"{med(runs, 'wall_s'):.1f}",
                           f"{med(runs, 'compile_s'):.1f}"] for name, runs in (("first", firsts), ("second", seconds))])
    kernels = firsts[0]["kernels"]
    lines += ["", f"The first run's longest compiles (round 1; a kernel's time includes the compiles it set off, "
              f"{len(kernels)} kernels in all):", ""]
    lines += table_lines(["kernel", "s"], [[f"`{k}`", f"{v:.2f}"] for k, v in
                                          sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]])
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
