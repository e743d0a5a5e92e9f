"""A/B of cold compile times: the working tree against a baseline commit.

Each compile runs in a fresh process with an empty on-disk grammar cache (a compile's
cost is the first run's, before the cache), the two versions' processes alternating;
each process first compiles one small schema, so that numba's cached kernels are loaded
before the clock starts. Reported: medians of the rounds, and current / baseline.
Schemas: pydantic's ``HttpUrl`` (a URI format under a counted length), a number between
+-1e300 (bounds hundreds of digits long), and 1 / 5 / 20 realistic tools at BPE 4k.

    python bench/compile_ab.py --baseline dbf4a1a
    python bench/compile_ab.py --baseline HEAD~1 --rounds 5 --out bench/results/compile_ab.md
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.constraint_ab import report_header, revisions, table_lines, write_report  # noqa: E402

#: What one process times; argv[1] is the checkout whose ``agentloop`` it must import.
CHILD = r"""
import json, sys, time
import agentloop
from agentloop.grammar import byte_tokenizer, compile_schema, compile_tools
from bench.tokenizers_offline import LOADERS, SCHEMAS
assert agentloop.__file__.startswith(sys.argv[1]), agentloop.__file__
out = {}
tok = byte_tokenizer()
compile_schema({"type": "string", "pattern": "^a+$", "maxLength": 5}, tok, "json")  # (kernels loaded)
schemas = {"HttpUrl (pydantic's schema), byte tokenizer": {"type": "string", "format": "uri", "minLength": 1,
                                                            "maxLength": 2083},
           "number in +-1e300, byte tokenizer": {"type": "number", "minimum": -1e300, "maximum": 1e300}}
for name, schema in schemas.items():
    t = time.perf_counter()
    compile_schema(schema, tok, "json")
    out[name] = time.perf_counter() - t
btok, aliases = LOADERS["bpe-4k"]()
tools = json.loads(SCHEMAS.read_text())
for n in (1, 5, 20):
    t = time.perf_counter()
    compile_tools(tools[:n], btok, "gemma4", aliases=aliases)
    out[f"{n} tools, gemma4, BPE 4k"] = time.perf_counter() - t
print(json.dumps(out))
"""


def export(rev: str, into: Path) -> Path:
    """``agentloop/`` and ``grammars/`` of ``rev`` (a git revision or a folder holding them)."""
    if Path(rev).is_dir():
        return Path(rev)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "agentloop", "grammars"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed(root: Path) -> dict[str, float]:
    """One process's compile times, importing ``agentloop`` from ``root``."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, AGENTLOOP_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([str(root), str(REPO)]))
        done = subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"the compile process for {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision, or a folder holding agentloop/ and grammars/")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per version (default 3), after one warmup")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compile_ab.md")
    args = parser.parse_args()
    rev, head, dirty = revisions(args.baseline)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"baseline": export(rev, Path(tmp)), "current": REPO}  # (rev: the folder itself for a folder)
        for root in sides.values():  # warmup: numba compiles each version's kernels into its cache once
            timed(root)
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, root in sides.items():
                runs[name].append(timed(root))
    rows = []
    for key in runs["baseline"][0]:
        base = statistics.median(r[key] for r in runs["baseline"])
        cur = statistics.median(r[key] for r in runs["current"])
        rows.append([key, f"{base:.3f}", f"{cur:.3f}", f"{cur / base:.2f}"])
        print(f"{key:48s} baseline {base:7.3f} s  current {cur:7.3f} s  current/baseline {cur / base:5.2f}")
    command = "python bench/compile_ab.py " + " ".join(sys.argv[1:])
    lines = report_header("Cold compile A/B", command, f"Python {platform.python_version()}", head, dirty, rev) + [
        f"Each compile in a fresh process with an empty on-disk cache, the versions alternating; medians of "
        f"{args.rounds} rounds after a warmup round.", ""]
    write_report(args.out, lines + table_lines(["schema", "baseline s", "current s", "current / baseline"], rows))


if __name__ == "__main__":
    main()
