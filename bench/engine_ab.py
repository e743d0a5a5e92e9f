"""A/B of the engine's constrained calls: the working tree against a baseline commit, side by
side in one process, calls alternating (these machines are noisy: quote the ratios).

``bench/constraint_ab.py`` times the constraint on random logits; this times it where it
runs, inside ``DiffusionEngine.generate`` on a random DiffusionGemma: canvases that a call
continues into (``partial``), logits a model wrote, self-conditioning between steps. Both
versions build the same random model (same seed) and decode the same calls (the first 5
tools of ``agentloop/data/tool_schemas.json`` or ``--tools N``, calls only, default sampler
settings; ``--allow-text`` lets a canvas answer in text, as an agent's grammar does); per call it
reports the constraint's time per denoising step, the decoder's, and whether both
versions emitted the same tokens.

    python bench/engine_ab.py --baseline HEAD~1                   # the tiny config (byte tokenizer)
    python bench/engine_ab.py --baseline HEAD~1 --configs tiny,40m --seeds 3
    python bench/engine_ab.py --baseline HEAD~1 --tools 20 --steps 16

Writes ``bench/results/engine_ab.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import json
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
import bench.fresh_kernels  # noqa: E402,F401  (before agentloop: see its docstring)
import torch  # noqa: E402

import agentloop  # noqa: E402
from bench.constraint import machine  # noqa: E402
from bench.constraint_ab import BASELINE_PACKAGE, export_baseline, revisions  # noqa: E402
from bench.engine import MODEL, SYSTEM, USER  # noqa: E402
from bench.tokenizers_offline import SCHEMAS, bpe_4k  # noqa: E402


ALL_TOOLS = json.loads(SCHEMAS.read_text("utf-8"))


def build(package: Any, config: str, tools: int, allow_text: bool) -> tuple[Any, Any, list[int]]:
    """(engine, grammar, prompt) of one version of the package."""
    engine_mod = importlib.import_module(f"{package.__name__}.engine")
    grammar_mod = importlib.import_module(f"{package.__name__}.grammar")
    tokenizer = grammar_mod.byte_tokenizer() if config == "tiny" else bpe_4k()[0]
    engine = engine_mod.DiffusionEngine.random(tokenizer, preset=config, canvas_length=256)
    grammar = grammar_mod.compile_tools(ALL_TOOLS[:tools], engine.tokenizer, "gemma4", allow_text=allow_text)
    return engine, grammar, engine.encode(SYSTEM + USER + MODEL)


def call(package: Any, built: tuple[Any, Any, list[int]], seed: int, steps: int) -> dict[str, Any]:
    engine, grammar, prompt = built
    options = importlib.import_module(f"{package.__name__}.engine").GenerationOptions(
        seed=seed, max_new_tokens=4 * engine.canvas_length, max_denoising_steps=steps)
    t = time.perf_counter()
    out = engine.generate_sync(engine.session(prompt), grammar, options=options)
    wall = time.perf_counter() - t
    c = out.cost
    return {"tokens": out.tokens, "steps": c.denoising_steps, "wall_s": wall,
            "constraint_ms_per_step": 1000 * c.constraint_s / max(c.denoising_steps, 1),
            "decoder_ms_per_step": 1000 * c.decoder_s / max(c.denoising_steps, 1),
            "valid": bool(out.finished and grammar.accepts(out.tokens + [out.stop_token]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision (or exported folder) to compare against")
    ap.add_argument("--configs", default="tiny", help="comma-separated: tiny (byte tokenizer), 40m (BPE 4k)")
    ap.add_argument("--tools", type=int, default=5, help="the first N tools of agentloop/data/tool_schemas.json")
    ap.add_argument("--allow-text", action="store_true", help="the grammar allows a text answer (as an agent's does)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=48, help="max denoising steps per canvas")
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_ab.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    numba.set_num_threads(a.threads)
    base_rev, head, dirty = revisions(a.baseline)
    with tempfile.TemporaryDirectory() as tmp:
        export_baseline(a.baseline, Path(tmp))
        baseline = importlib.import_module(BASELINE_PACKAGE)
        rows = []
        for config in a.configs.split(","):
            built = {name: build(package, config, a.tools, a.allow_text)
                     for name, package in (("baseline", baseline), ("current", agentloop))}
            call(baseline, built["baseline"], 999, 2)  # warm: numba kernels, caches
            call(agentloop, built["current"], 999, 2)
            for seed in range(a.seeds):
                got = {}
                for name, package in (("baseline", baseline), ("current", agentloop)):
                    got[name] = call(package, built[name], seed, a.steps)
                    print(config, seed, name, {k: v for k, v in got[name].items() if k != "tokens"}, flush=True)
                rows.append((config, seed, got))
    lines = ["# Engine A/B: constrained calls", "",
             f"Command: `python bench/engine_ab.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()['platform']}, {machine()['cpu_count']} CPUs, {a.threads} torch/numba thread(s)  ",
             f"Current: agentloop at {head}{' + uncommitted changes' if dirty else ''}; baseline: {base_rev}", "",
             "Both versions in one process, calls alternating; a random DiffusionGemma (same seed for both), "
             f"256-token canvas, {a.tools} tools ({'calls or a text' if a.allow_text else 'calls only'}), "
             "default sampler settings but at most "
             f"{a.steps} steps per canvas. Per call: milliseconds per denoising step.", "",
             "| config | seed | steps | baseline constraint | current constraint | ratio | decoder (current) "
             "| same tokens | valid (current) |", "|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {}
    for config, seed, got in rows:
        b, c = got["baseline"], got["current"]
        ratio = c["constraint_ms_per_step"] / b["constraint_ms_per_step"]
        ratios.setdefault(config, []).append(ratio)
        lines.append(f"| {config} | {seed} | {c['steps']} | {b['constraint_ms_per_step']:.2f} | "
                     f"{c['constraint_ms_per_step']:.2f} | {ratio:.2f} | {c['decoder_ms_per_step']:.1f} | "
                     f"{'yes' if b['tokens'] == c['tokens'] else 'no'} | {c['valid']} |")
    lines += [""] + [f"- {config}: constraint per step, current / baseline, median over seeds: "
                     f"**{statistics.median(r):.2f}x**" for config, r in ratios.items()]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
