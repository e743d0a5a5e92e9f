"""Engine benchmark: where the time of one engine call goes, with and without the constraint,
and what the session cache saves over a 10-turn session.

Three measurements, each side by side in one run (medians; these machines are noisy):

1. Per call, for a tiny (byte tokenizer, 274 tokens) and a ~40M-parameter (4k byte BPE)
   random DiffusionGemma at a 256-token canvas: latency split into encoder / decoder /
   constraint / sampler / overhead, denoising steps per canvas, tokens forced by the
   grammar and tokens per decoder forward, unconstrained and constrained (5 tools from
   agentloop/data/tool_schemas.json, calls only), interleaved A B A B over seeds. Default
   sampler settings (48 steps at most, adaptive stop). Random weights are never confident,
   so the unconstrained loop runs all 48 steps; the constrained one stops once the
   grammar leaves it no doubt.
2. A 10-turn session on the 40M config: per turn a ~60-token tool result is appended and
   one canvas is denoised (4 fixed steps, so encoding is visible). With the session cache
   each turn encodes only the new tokens; without it (``reset_cache`` before each call)
   it re-encodes the whole history. Reports the encoder time and the call time per turn and
   their ratio.
3. The sampler alone at Gemma's 262,144-token vocabulary on a (1, 256, V) logits tensor:
   the library's step (softmax + multinomial + argmax + entropy for acceptance + entropy
   for the stop test) against our one-pass ``fused_draw``.

Run from the repository root::

    python bench/engine.py           # full run (a few minutes)
    python bench/engine.py --quick   # smoke size (seconds)

Writes ``bench/results/engine.json`` and ``engine.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agentloop.engine import DiffusionEngine, GenerationOptions  # noqa: E402
from agentloop.engine.sampling import fused_draw, reference_draw  # noqa: E402
from agentloop.grammar import byte_tokenizer, compile_tools  # noqa: E402
from bench.constraint import code_state, machine  # noqa: E402
from bench.tokenizers_offline import bpe_4k  # noqa: E402

TOOLS = json.loads((REPO / "agentloop" / "data" / "tool_schemas.json").read_text("utf-8"))[:5]
SYSTEM = ("<|turn>system\nYou are a helpful assistant with tools. Call a tool when the user asks for "
          "something a tool can do, and answer briefly otherwise.<turn|>\n")
USER = "<|turn>user\nWhat is the weather in Paris for the next 3 days, and how far is 12 miles in km?<turn|>\n"
MODEL = "<|turn>model\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def call_rows(name: str, engine: DiffusionEngine, seeds: int) -> list[dict[str, Any]]:
    """Unconstrained vs constrained calls, interleaved over seeds."""
    t = time.perf_counter()
    g = compile_tools(TOOLS, engine.tokenizer, "gemma4", allow_text=False)
    compile_s = time.perf_counter() - t
    prompt = engine.encode(SYSTEM + USER + MODEL)
    costs: dict[str, list[Any]] = {"unconstrained": [], "constrained": []}
    valid = {"unconstrained": 0, "constrained": 0}
    opts = GenerationOptions(max_new_tokens=4 * engine.canvas_length)
    engine.generate_sync(engine.session(prompt), g, options=opts.replace(seed=999, max_denoising_steps=2))  # warm
    for seed in range(seeds):
        for mode in ("unconstrained", "constrained"):
            out = engine.generate_sync(engine.session(prompt), g if mode == "constrained" else None,
                                       options=opts.replace(seed=seed))
            costs[mode].append(out.cost)
            valid[mode] += bool(out.finished and g.accepts(out.tokens + [out.stop_token]))
    rows = []
    for mode, cs in costs.items():
        rows.append({
            "config": name, "mode": mode, "calls": len(cs), "valid_calls": valid[mode],
            "params_m": round(sum(p.numel() for p in engine.model.parameters()) / 1e6, 1),
            "vocab": engine.vocab_size, "canvas": engine.canvas_length, "prompt_tokens": len(prompt),
            "grammar_compile_s": round(compile_s, 3) if mode == "constrained" else None,
            "total_ms": 1000 * med([c.total_s for c in cs]),
            "encoder_ms": 1000 * med([c.encoder_s for c in cs]),
            "decoder_ms": 1000 * med([c.decoder_s for c in cs]),
            "constraint_ms": 1000 * med([c.constraint_s for c in cs]),
            "sampler_ms": 1000 * med([c.sampler_s for c in cs]),
            "overhead_ms": 1000 * med([c.overhead_s for c in cs]),
            "canvases": med([c.canvases for c in cs]),
            "steps_per_canvas": med([c.denoising_steps / c.canvases for c in cs]),
            "forced_tokens": med([c.forced_tokens for c in cs]),
            "generated_tokens": med([c.generated_tokens for c in cs]),
            "tokens_per_forward": med([c.tokens_per_forward for c in cs]),
            "decoder_ms_per_step": 1000 * med([c.decoder_s / c.denoising_steps for c in cs if c.denoising_steps]),
            "constraint_pct_of_decoder": 100 * med([c.constraint_s / c.decoder_s for c in cs if c.decoder_s]),
        })
    return rows


def session_rows(engine: DiffusionEngine, turns: int) -> dict[str, Any]:
    """A session of ``turns`` turns: the session cache against re-encoding the history, interleaved.

    Each turn the re-encoded contender starts a fresh session from the cached session's
    history (what a runtime without a session cache does), so both see the same tokens.
    """
    opts = GenerationOptions(max_new_tokens=engine.canvas_length, max_denoising_steps=4, fixed_steps=True,
                             stop_ids=[])
    cached = engine.session(SYSTEM + USER + MODEL)
    per: dict[str, list[Any]] = {"cached": [], "re-encoded": []}
    for turn in range(turns):
        fresh = engine.session(cached.tokens)
        per["re-encoded"].append(engine.generate_sync(fresh, options=opts.replace(seed=turn)).cost)
        per["cached"].append(engine.generate_sync(cached, options=opts.replace(seed=turn)).cost)
        cached.append_text(f"<|tool_response>response:get_weather{{value:<|\"|>Paris, day {turn}: {12 + turn} C, "
                           f"wind {turn * 3} km/h, humidity {40 + turn}%, no rain expected.<|\"|>}}<tool_response|>"
                           + MODEL)
    enc = {k: sum(c.encoder_s for c in v) for k, v in per.items()}
    tot = {k: sum(c.total_s for c in v) for k, v in per.items()}
    pre = {k: sum(c.prefill_tokens for c in v) for k, v in per.items()}
    return {
        "config": f"{sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M params, V={engine.vocab_size}, "
                  f"canvas {engine.canvas_length}",
        "turns": turns, "final_history_tokens": len(cached),
        "prefill_tokens": pre, "encoder_s": enc, "total_s": tot,
        "per_turn_encoder_ms": {k: [round(1000 * c.encoder_s, 2) for c in v] for k, v in per.items()},
        "encoder_ratio": enc["re-encoded"] / enc["cached"], "total_ratio": tot["re-encoded"] / tot["cached"],
        "last_turn_total_ratio": per["re-encoded"][-1].total_s / per["cached"][-1].total_s,
    }


def sampler_row(vocab: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 256, vocab, generator=g) * 4  # (1, 256, V)
    lib, ours = [], []
    for _ in range(repeats):
        x = logits.clone()
        t = time.perf_counter()
        tempered = x / 0.8
        reference_draw(tempered, g)  # softmax, multinomial, argmax, entropy for acceptance
        torch.distributions.Categorical(logits=tempered).entropy().mean()  # the stop test's second entropy
        lib.append(time.perf_counter() - t)
        x = logits.clone()
        t = time.perf_counter()
        fused_draw(x, 0.8, g)
        ours.append(time.perf_counter() - t)
    return {"vocab": vocab, "canvas": 256, "library_ms": 1000 * med(lib), "fused_ms": 1000 * med(ours),
            "speedup": med(lib) / med(ours), "threads": torch.get_num_threads()}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# Engine benchmark", "",
             f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']}. "
             f"Command: `{res['command']}`. Medians over {res['seeds']} seeds per mode, interleaved.", "",
             "## One call (256-token canvas, 5 tools, default sampler settings)", "",
             "| config | mode | total ms | encoder | decoder | constraint | sampler | overhead | canvases | "
             "steps/canvas | forced | tokens | tok/forward | valid | constraint % of decoder |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["calls"]:
        lines.append(
            f"| {r['config']} ({r['params_m']}M, V={r['vocab']}) | {r['mode']} | {r['total_ms']:.0f} | "
            f"{r['encoder_ms']:.1f} | {r['decoder_ms']:.0f} | {r['constraint_ms']:.0f} | {r['sampler_ms']:.0f} | "
            f"{r['overhead_ms']:.0f} | {r['canvases']:.0f} | {r['steps_per_canvas']:.1f} | "
            f"{r['forced_tokens']:.0f} | {r['generated_tokens']:.0f} | {r['tokens_per_forward']:.2f} | "
            f"{r['valid_calls']}/{r['calls']} | {r['constraint_pct_of_decoder']:.1f} |")
    s = res["session"]
    lines += ["", f"## Session cache over {s['turns']} turns ({s['config']}, {s['final_history_tokens']} tokens at "
              "the end, 4 fixed steps per canvas)", "",
              "| | prefill tokens | encoder s | call s |", "|---|---|---|---|"]
    for k in ("cached", "re-encoded"):
        lines.append(f"| {k} | {s['prefill_tokens'][k]} | {s['encoder_s'][k]:.3f} | {s['total_s'][k]:.3f} |")
    lines += ["", f"Re-encoding the history costs {s['encoder_ratio']:.1f}x the encoder time of the session cache "
              f"and {s['total_ratio']:.2f}x the call time over the session ({s['last_turn_total_ratio']:.2f}x "
              "on the last turn).", ""]
    sp = res["sampler"]
    lines += [f"## Sampler alone at V={sp['vocab']} (1 x 256 x V logits, {sp['threads']} threads)", "",
              f"Library step (softmax + multinomial + argmax + two entropy passes): {sp['library_ms']:.0f} ms; "
              f"`fused_draw` (one pass): {sp['fused_ms']:.0f} ms; {sp['speedup']:.1f}x.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke size: seconds, figures meaningless")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    seeds = 2 if a.quick else 5
    res: dict[str, Any] = {"command": " ".join(["python", "bench/engine.py"] + sys.argv[1:]),
                           "machine": machine(), "code": code_state(), "seeds": seeds, "calls": []}
    configs = [("tiny", lambda: DiffusionEngine.random(byte_tokenizer(), preset="tiny", canvas_length=256))]
    if not a.quick:
        configs.append(("40m", lambda: DiffusionEngine.random(bpe_4k()[0], preset="40m", canvas_length=256)))
    for name, make in configs:
        log(f"calls: {name}")
        res["calls"] += call_rows(name, make(), seeds)
        log(json.dumps(res["calls"][-2:], default=str))
    log("session")
    eng = (DiffusionEngine.random(byte_tokenizer(), canvas_length=32) if a.quick
           else DiffusionEngine.random(bpe_4k()[0], preset="40m", canvas_length=256))
    res["session"] = session_rows(eng, 3 if a.quick else 10)
    log("sampler")
    res["sampler"] = sampler_row(4096 if a.quick else 262_144, 2 if a.quick else 5)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "engine.json").write_text(json.dumps(res, indent=1, default=str))
    md = to_markdown(res)
    (a.out / "engine.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
