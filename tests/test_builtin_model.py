"""The bundled demo model: small, loads offline from the package, and runs the real loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentloop import demo_tools as demo
from agentloop.builtin import BUILTIN_MODEL_DIR, card_options, demo_agent, model_card

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (BUILTIN_MODEL_DIR / "config.json").is_file(),
                                reason="this checkout has no bundled model")


def test_shipped_files_are_small_and_described():
    size = sum(f.stat().st_size for f in BUILTIN_MODEL_DIR.iterdir())
    assert size < 20e6, size
    card = model_card()
    assert card["declare_tools"] is False and card["wire_format"] == "gemma4" and card["trained_steps"] > 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f.name for f in BUILTIN_MODEL_DIR.iterdir()}


def test_one_request_its_call_and_its_answer(tmp_path):
    agent = demo_agent(options=card_options(seed=0))
    # One request the shipped model gets right end to end, pinned so that a break anywhere
    # in the loop (prompt, tokenizer, engine, grammar, tools) shows; how often it is right
    # on requests it never saw is the evaluation's job (bench/results/demo_eval.md).
    r = agent.run_sync("How is the weather in Berlin?", deps=tmp_path)
    assert [(c.call.name, c.call.arguments) for c in r.calls] == [("get_weather", {"city": "Berlin"})]
    # it read the tool's result: condition and temperature are copied into the answer
    facts = str(demo.get_weather("Berlin")).split(": ", 2)[2]  # e.g. "light rain, -5 C"
    assert r.output is not None and "Berlin" in r.output and facts in r.output, r.output
    assert r.usage.steps == 2 and r.usage.tool_calls == 1


def test_a_low_temperature_loop_runs(tmp_path):
    """At temperature 0.1 the model's logits span ~360 nats, and the canvas needs tokens
    far below each position's best: this request and seed once stopped the loop with a
    division by zero in the canvas DP (an underflowed product), and the host's float32
    vocabulary pass zeroed such tokens outright."""
    agent = demo_agent(options=card_options(seed=100_202, t_max=0.1))
    r = agent.run_sync("Express 620 cm in inches.", deps=tmp_path)
    assert [c.call.name for c in r.calls] == ["convert_units"] and r.output


def test_a_very_low_temperature_loop_runs(tmp_path):
    """At temperature 0.02 a row spans thousands of nats and the canvas's float64 weights
    leave their range: this request stopped with "no valid canvas" until such canvases
    were redone in log space (grammar/log_canvas.py)."""
    agent = demo_agent(options=card_options(seed=100_202, t_max=0.02, t_min=0.02))
    r = agent.run_sync("Express 620 cm in inches.", deps=tmp_path)
    assert [c.call.name for c in r.calls] == ["convert_units"] and r.output


def test_demo_command_runs_offline_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/nonexistent")
    r = subprocess.run([sys.executable, "-m", "agentloop.cli", "demo", "What is 12 miles in km?"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # offline, in a fresh process: the model called a tool, the tool ran, an answer came back
    assert "convert_units(" in r.stderr and "-> ok:" in r.stderr and r.stdout.strip(), (r.stdout, r.stderr)
