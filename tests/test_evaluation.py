"""The evaluation harness judges runs right and wrong for the right reasons (scripted models)."""

from __future__ import annotations

import anyio
import pytest

from agentloop import Agent
from agentloop import demo_tools as demo
from agentloop.evaluation import Case, cases, run_case, summarize
from agentloop.testing import ScriptedEngine, call
from agentloop.training.data import conversations

SCHEMAS = {t.name: t.parameters for t in demo.TOOLS}


def _case(kind: str, intent: str | None = None) -> Case:
    for conv in conversations(2000, 5, "heldout"):
        if conv.kind == kind and (intent is None or conv.meta.get("intent") == intent):
            return Case.from_conversation(conv)
    raise AssertionError("no such case")


def _run(case: Case, script, **agent_kw):
    agent = Agent(ScriptedEngine(script), demo.TOOLS, declare_tools=False, **agent_kw)
    return anyio.run(run_case, agent, case, "copy", SCHEMAS, 0)


def test_cases_are_deterministic_held_out_and_sized():
    a = cases(8, 5, 2, seed=3)
    assert a == cases(8, 5, 2, seed=3)
    assert [c.kind for c in a].count("single") == 8 and [c.kind for c in a].count("answer") == 2
    assert sum(c.kind in ("chain", "parallel", "error") for c in a) == 5
    train_prompts = {c.user for c in conversations(3000, 3, "train")}
    assert not {c.prompt for c in a} & train_prompts
    trained_phrasings = cases(8, 5, 2, seed=3, split="train")
    assert trained_phrasings != a and len(trained_phrasings) == 15


def test_a_right_weather_run_is_right():
    case = _case("single", "weather")
    city = case.expected[0][0].arguments["city"]
    day = str(demo.get_weather(city)).split(": ", 2)[2]
    o = _run(case, [call("get_weather", city=city), f"In {city}: {day}."])
    assert o.right and o.right_calls and o.failure is None and o.invalid_calls == 0


def test_wrong_argument_and_wrong_answer_are_told_apart():
    case = _case("single", "weather")
    city = case.expected[0][0].arguments["city"]
    wrong = case.prompt.split()[0]  # a copy from the request: the constraint allows it, the judge does not
    o = _run(case, [call("get_weather", city=wrong), "whatever"])
    assert not o.right and o.failure == "wrong argument: city"
    o = _run(case, [call("get_weather", city=city), "It is nice."])
    assert o.right_calls and not o.right and o.failure == "wrong answer"


def test_chain_needs_every_step():
    case = _case("chain")
    (conv,), (calc,) = case.expected
    res = str(demo.convert_units(**conv.arguments))
    out = res.split(" = ")[1].split(" ")[0]
    expr = calc.arguments["expression"]
    assert expr.startswith(out)
    total = str(demo.calculator(expr))
    o = _run(case, [conv, calc, f"That makes {total}."])
    assert o.right, o
    o = _run(case, [conv, f"That makes {total}."])
    assert not o.right and o.failure == "stopped early"


def test_unconstrained_malformed_call_counts_as_invalid():
    case = _case("single", "weather")
    o = _run(case, ['<|tool_call>call:get_weather{city:'], constrained=False)
    assert o.failure == "malformed call" and o.invalid_calls == 1 and not o.right
    s = summarize([o])
    assert s["valid_calls"] == 0.0 and s["failures"] == {"malformed call": 1}


@pytest.mark.parametrize("kind", ["answer", "parallel", "error"])
def test_other_kinds_judge_a_faithful_replay_right(kind):
    case = _case(kind)
    script = [list(step) for step in case.expected]
    if kind == "answer":
        script.append(case.answer)
    elif kind == "parallel":
        days = [str(demo.get_weather(c.arguments["city"])).split(": ", 2)[2] for c in case.expected[0]]
        script.append(" and ".join(days))
    elif case.expected[-1][0].name == "get_time":
        script.append(f"Sorry, I don't know the time zone of {case.expected[-1][0].arguments['city']}.")
    else:
        script.append(f"It is {demo.calculator(case.expected[-1][0].arguments['expression'])}.")
    o = _run(case, script)
    assert o.right, o


def test_single_calls_are_reported_by_held_out_phrasing():
    from agentloop.training.data import ADDED_HELDOUT, TEMPLATES

    held = {p for _, hs in TEMPLATES.values() for p in hs}
    trained = {p for ts, _ in TEMPLATES.values() for p in ts}
    assert ADDED_HELDOUT <= held and not ADDED_HELDOUT & trained
    case = _case("single", "weather")
    assert case.phrasing in TEMPLATES["weather"][1] and case.prompt != case.phrasing
    right = _run(case, [[call("get_weather", city=case.expected[0][0].arguments["city"])], "no idea"])
    assert right.phrasing == case.phrasing
    row = summarize([right])["by_phrasing"][case.phrasing]
    assert row == {"n": 1, "intent": "weather", "right_calls": 1.0}
