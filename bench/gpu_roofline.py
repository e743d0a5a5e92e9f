"""One prepared GPU check: DiffusionGemma at real width (26B-A4B architecture, random weights,
bf16), a 4k-token prompt, fixed 16 denoising steps, against the memory-bandwidth roofline.

Measures, on whatever CUDA card it finds:

* prefill of a 4,096-token prompt (encoder into the session cache);
* one denoising step (decoder forward over 256 canvas tokens + the cached prefix), median
  of the 16 steps of a canvas, unconstrained and under a 5-tool grammar;
* one canvas (16 steps) and one agent-loop turn (incremental prefill of a ~60-token tool
  result + one canvas), unconstrained and constrained;

and compares the step with the roofline: every step reads all weights once (256 tokens
hit all 128 experts), so step >= weight bytes / memory bandwidth.

    python bench/gpu_roofline.py --out bench/results

The weights take 50.5 GB at bf16. A plain build of the model allocates the encoder and
decoder stacks apart and ties their weights afterwards, ~100 GB for a moment: on an 80 GB
H100 that ran out of memory (78.5 GB allocated, inside the decoder's layers).
``models.build_tied`` now allocates each tied weight once; that build has not run on a GPU
yet.

Writes ``gpu_roofline.json`` and prints a summary. The weights are random: figures are
speed only. The architecture is approximate (see ``agentloop/engine/models.py``); a real
checkpoint's numbers come from ``agentloop bench --model PATH --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agentloop.benchmark import bench_tools  # noqa: E402
from agentloop.engine import DiffusionEngine, Draft, GenerationOptions  # noqa: E402
from agentloop.grammar import compile_tools  # noqa: E402

#: Peak memory bandwidth (bytes/s) of the cards this project talks about.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "RTX PRO 6000": 1.79e12, "RTX 5090": 1.79e12, "A100": 2.0e12}


def bandwidth(name: str) -> float | None:
    return next((b for k, b in BANDWIDTH.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    gpu = torch.cuda.get_device_name(0)
    t = time.perf_counter()
    engine = DiffusionEngine.random(preset="diffusiongemma-26b-a4b", device="cuda", dtype="bfloat16",
                                    vocab_size=262_144, max_position_embeddings=32_768)
    build_s = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    g = compile_tools(bench_tools()[:5], engine.tokenizer, "gemma4")
    opts = GenerationOptions(max_denoising_steps=a.steps, fixed_steps=True, max_new_tokens=256, seed=0, stop_ids=[])
    prompt = torch.randint(11, engine.tokenizer.get_vocab_size(), (a.prompt_tokens,)).tolist()
    result: dict = {"gpu": gpu, "torch": torch.__version__, "build_s": build_s, "weight_gb": weight_bytes / 1e9,
                    "prompt_tokens": a.prompt_tokens, "steps": a.steps}
    tool_result = engine.encode('<|tool_response>response:get_weather{value:<|"|>Paris: sunny, 18 C; '
                                'tomorrow rain, 14 C, wind 12 km/h<|"|>}<tool_response|>')
    for mode, constraint in (("warmup", None), ("unconstrained", None), ("constrained", g)):
        s = engine.session(prompt)
        stamps: list[float] = []

        def on_draft(d: Draft) -> None:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        first = engine.generate_sync(s, constraint, options=opts, on_draft=on_draft)
        s.append(tool_result)
        t1 = time.perf_counter()
        turn = engine.generate_sync(s, constraint, options=opts)
        t2 = time.perf_counter()
        steps = [b - a_ for a_, b in zip([t0 + first.cost.encoder_s] + stamps[:-1], stamps)]
        if mode == "warmup":
            continue
        c = first.cost
        result[mode] = {
            "prefill_ms": 1000 * c.encoder_s, "step_ms_median": 1000 * statistics.median(steps),
            "decoder_ms_per_step": 1000 * c.decoder_s / c.denoising_steps,
            "constraint_ms_per_step": 1000 * c.constraint_s / c.denoising_steps,
            "sampler_ms_per_step": 1000 * c.sampler_s / c.denoising_steps,
            "canvas_ms": 1000 * (c.total_s - c.encoder_s), "first_call_ms": 1000 * (t1 - t0),
            "turn_ms": 1000 * (t2 - t1), "turn_prefill_tokens": turn.cost.prefill_tokens,
        }
    bw = bandwidth(gpu)
    if bw:
        floor = 1000 * weight_bytes / bw
        result["roofline_step_ms"] = floor
        for mode in ("unconstrained", "constrained"):
            result[mode]["step_over_roofline"] = result[mode]["decoder_ms_per_step"] / floor
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_roofline.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
