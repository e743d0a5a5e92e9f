"""`agentloop bench` runs end to end at a tiny size (figures are not asserted, fields are)."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from agentloop.benchmark import CONTENDERS, PARTS, BenchConfig, run, scenarios, write
from agentloop.cli import main


def test_scenarios_cover_the_issue() -> None:
    names = [s.name for s in scenarios()]
    for prefix in ("single call / 1 tool", "single call / 5 tools", "single call / 20 tools", "5-turn chain",
                   "3 parallel calls", "answer only", "long session (30 turns)"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_bench_runs_end_to_end(tmp_path) -> None:
    cfg = BenchConfig(repeats=1, quick=True, canvas_length=64, steps=2, only=("single call / 1", "3 parallel", "long"))
    res = run(cfg)
    rows = res["summary"]
    assert {(r["scenario"], r["contender"]) for r in rows} == {
        (s, c) for s in ("single call / 1 tool", "3 parallel calls / 5 tools", "long session (6 turns) / 5 tools")
        for c in CONTENDERS}
    for r in rows:
        assert r["median_ms"] > 0 and r["p95_ms"] >= r["median_ms"]
        assert all(f"{p}_ms" in r for p in PARTS)
        assert r["ratio_to_agentloop"] is not None
        if r["contender"] == "autoregressive":
            assert r["valid"] is None  # forced lengths: not a finished call
        else:
            assert 0.0 <= r["valid"] <= 1.0
    agent = {r["scenario"]: r for r in rows if r["contender"] == "agentloop"}
    assert all(a["ratio_to_agentloop"] == 1.0 for a in agent.values())
    # the session cache pays off: without it every turn re-encodes the history
    nocache = {r["scenario"]: r for r in rows if r["contender"] == "no-cache"}
    long = "long session (6 turns) / 5 tools"
    assert nocache[long]["prefill_tokens"] > 3 * agent[long]["prefill_tokens"]
    paths = write(res, tmp_path, "test")
    assert json.loads(paths["json"].read_text())["summary"] == json.loads(json.dumps(rows))
    assert paths["png"].stat().st_size > 10_000
    assert paths["md"].read_text().startswith("# Loop-latency benchmark")


def test_bench_cli(tmp_path) -> None:
    r = CliRunner().invoke(main, ["bench", "--quick", "--repeats", "1", "--steps", "1", "--scenario",
                                  "answer only", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "loop.png").exists() and "answer only" in (tmp_path / "loop.md").read_text()


def test_demo_domain_runs_with_per_turn_copy_grammars() -> None:
    from agentloop.benchmark import demo_scenarios

    names = [s.name for s in demo_scenarios()]
    assert any(n.startswith("single call / 9 tools") for n in names) and any("30 turns" in n for n in names)
    cfg = BenchConfig(repeats=1, quick=True, canvas_length=64, steps=2, only=("single call / 1", "3-turn"),
                      domain="demo")
    res = run(cfg)
    assert res["domain"] == "demo"
    rows = {(r["scenario"], r["contender"]): r for r in res["summary"]}
    # the per-turn compile of the copy grammar is paid for, as constraint time
    assert rows[("single call / 1 tool", "agentloop")]["constraint_ms"] > 0


def test_every_scripted_demo_turn_is_valid_under_its_turn_grammar() -> None:
    """The copy sources follow the conversation: each scripted call copies from them."""
    from agentloop.benchmark import Conversation, demo_scenarios, demo_tool_schemas, turn_grammar
    from agentloop.engine import DiffusionEngine
    from agentloop.grammar import compile_tools
    from agentloop.grammar.vocabulary import encode_text
    from agentloop.protocol import Protocol

    engine = DiffusionEngine.random(canvas_length=64)
    by_name = {t["name"]: t for t in demo_tool_schemas()}
    for s in demo_scenarios(quick=True):
        conv = Conversation(Protocol("gemma4"), [by_name[n] for n in s.tools], declare_tools=False)
        base = compile_tools(conv.tools, engine.tokenizer, "gemma4")
        first = True
        for turn in s.turns:
            conv.before(turn, first)
            g, seconds = turn_grammar(base, engine, conv)
            assert g is not base and seconds > 0
            stop = conv.protocol.text_stop if isinstance(turn.output, str) else conv.protocol.calls_stop
            assert g.accepts(conv.output_ids(engine, turn) + encode_text(engine.tokenizer, stop)), (s.name, turn)
            conv.after(turn)
            first = isinstance(turn.output, str)


def test_a_scenario_longer_than_the_context_is_skipped_and_reported() -> None:
    from agentloop.engine.models import BUILTIN_MODEL_DIR

    if not (BUILTIN_MODEL_DIR / "config.json").is_file():
        pytest.skip("needs the bundled model (2,048 positions)")
    res = run(BenchConfig(model="builtin", steps=1, repeats=1, only=("long",)))
    assert res["summary"] == [] and "needs" in res["skipped"]["long session (30 turns) / 5 tools"]
    # and a model with a card is sampled as its card says (as demo_agent() runs it), not
    # with DiffusionGemma's defaults: 0.8 -> 0.4 took the bundled model 21 steps a turn
    from agentloop.builtin import card_options

    card = card_options()
    assert res["sampler"] == {"t_max": card.t_max, "t_min": card.t_min, "entropy_bound": card.entropy_bound,
                              "source": "model card"}
    assert run(BenchConfig(steps=1, repeats=1, only=("answer",)))["sampler"]["source"] == "GenerationOptions defaults"
