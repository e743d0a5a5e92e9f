"""Evaluate a demo model on held-out conversations, through the real agent loop and tools.

Each case is a held-out conversation (phrasings and entity values never trained on). The
agent runs it with the demo tools in a scratch sandbox; the run is right when its calls
are the expected ones (name and every argument, parallel calls in any order) and its final
answer states what the tool results said. Four modes run the same model side by side:

* ``grounded``: as the demo agent runs: the copy constraint, and numbers in the final
  answer held to those the conversation wrote (``Agent(grounded_numbers=True)``);
* ``copy``: the grammar plus the copy constraint (``Copied`` and ``CopiedNumbers`` parameters);
* ``grammar``: the tools' JSON schemas only;
* ``unconstrained``: no grammar; the text is parsed, as prompt-and-parse runtimes do.

    agentloop eval                       # bundled model, writes bench/results/demo_eval.{json,md}

>>> Case.from_conversation(next(conversations(1, seed=3, split="heldout"))).kind in KINDS
True
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import jsonschema

from .benchmark import describe_machine, machine_info
from .errors import AgentloopError, MaxStepsExceeded, ModelOutputError, ToolRetriesExhausted
from .grammar import ToolCall
from .training.data import ADDED_HELDOUT, KINDS, Conversation, Split, conversations

MODES = ("grounded", "copy", "grammar", "unconstrained")


@dataclass(frozen=True)
class Case:
    """One held-out request and the calls a right run makes, step by step."""

    kind: str
    intent: str  #: the single-call intent, or the kind
    prompt: str
    expected: tuple[tuple[ToolCall, ...], ...]  #: calls per model step
    files: tuple[tuple[str, str], ...] = ()  #: sandbox files the request refers to
    answer: str | None = None  #: the expected final answer where it is fixed text
    phrasing: str = ""  #: the request's template (single calls)

    @classmethod
    def from_conversation(cls, conv: Conversation) -> "Case":
        expected = tuple(s.calls for s in conv.steps if s.calls)
        files: tuple[tuple[str, str], ...] = ()
        intent = conv.meta.get("intent", conv.kind)
        if intent == "read":
            files = ((conv.steps[0].calls[0].arguments["path"], conv.steps[0].results[0]),)
        return cls(conv.kind, intent, conv.user, expected, files,
                   conv.steps[-1].answer if conv.kind == "answer" else None, conv.meta.get("template", ""))


@dataclass
class Outcome:
    """What one run did, and whether it was right."""

    mode: str
    kind: str
    intent: str
    prompt: str
    right_calls: bool
    right: bool
    failure: str | None
    calls: list[dict[str, Any]]
    answer: str | None
    invalid_calls: int
    n_calls: int
    model_steps: int
    canvases: int
    denoising_steps: int
    turn_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    phrasing: str = ""


def _normal(tools: dict[str, Any], call: ToolCall) -> tuple[str, str]:
    """A call with its defaults filled and numbers compared by value."""
    t = tools.get(call.name)
    args: Any = dict(call.arguments)
    if t is not None:
        try:
            args = t._model.model_validate(args).model_dump(mode="json")
        except Exception:  # pydantic's errors have no common base: invalid arguments compare as written
            pass
    return call.name, json.dumps({k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                                  for k, v in sorted(args.items())}, sort_keys=True)


def _first_day(result: str) -> str:
    """'City: day 1: rain, 12 C; day 2: ...' -> 'rain, 12 C'."""
    return result.split("; ")[0].split(": ", 2)[-1]


def _facts(case: Case, results: list[str]) -> list[str]:
    """What the final answer must state, from the run's own tool results."""
    if case.answer is not None:
        return [case.answer]
    if not results:
        return []
    last = results[-1]
    if case.intent in ("weather", "weather_days") or case.kind == "parallel":
        return [_first_day(r) for r in results]
    if case.intent == "time":
        return [last.split(" ")[-2]]  # "City: 2026-05-01 14:05 (Europe/Paris)" -> "14:05"
    if case.intent == "note":
        return [case.expected[0][0].arguments["title"]]
    if case.intent == "write":
        return [case.expected[0][0].arguments["path"]]
    if case.kind == "error" and case.expected[-1][0].name == "get_time":
        return [case.expected[-1][0].arguments["city"]]
    return [last]  # calculator, conversion, chain total, read content


def _judge(case: Case, tools: dict[str, Any], steps: list[list[Any]], answer: str | None) -> tuple[bool, bool, str | None]:
    """(right calls, right run, failure kind) from the calls grouped by model step."""
    want = [sorted(_normal(tools, c) for c in s) for s in case.expected]
    got = [sorted(_normal(tools, r.call) for r in s) for s in steps]
    if case.kind == "error" and case.expected[-1][0].name == "calculator" and got == want[1:]:
        want = want[1:]  # calling the corrected expression straight away is right too
    right_calls = got == want
    failure = None
    if not right_calls:
        if not got:
            failure = "no call"
        elif not want:
            failure = "called a tool for a chat message"
        else:
            for w, g in zip(want, got):
                if w == g:
                    continue
                if [n for n, _ in w] != [n for n, _ in g]:
                    failure = "wrong tool"
                else:
                    bad = sorted({k for (_, wa), (_, ga) in zip(w, g)
                                  for k, v in json.loads(wa).items() if json.loads(ga).get(k) != v})
                    failure = "wrong argument: " + ",".join(bad)
                break
            else:
                failure = "too many steps" if len(got) > len(want) else "stopped early"
    results = [r.result.content for s in steps for r in s]
    facts = _facts(case, results) if right_calls else []
    right = right_calls and answer is not None and all(f in answer for f in facts)
    if right_calls and not right:
        failure = "wrong answer"
    return right_calls, right, failure


async def run_case(agent: Any, case: Case, mode: str, schemas: dict[str, Any], seed: int) -> Outcome:
    """Run one case in a fresh sandbox; never raises for the model's mistakes."""
    tools = {t.name: t for t in agent.tools}
    t0 = time.perf_counter()
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="agentloop-eval-") as sandbox:
        for name, text in case.files:
            (Path(sandbox) / name).write_text(text, "utf-8")
        result: Any
        try:
            result = await agent.run(case.prompt, deps=sandbox)
        except (MaxStepsExceeded, ToolRetriesExhausted, ModelOutputError) as e:
            result = e.partial
            failure = {MaxStepsExceeded: "max steps", ToolRetriesExhausted: "tool retries exhausted",
                       ModelOutputError: "malformed call"}[type(e)]
        except AgentloopError as e:
            result, failure = None, f"error: {type(e).__name__}"
    seconds = time.perf_counter() - t0
    records = list(result.calls) if result is not None else []
    by_step: dict[int, list[Any]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    invalid = 0
    for r in records:
        schema = schemas.get(r.call.name)
        if schema is None or not jsonschema.Draft202012Validator(schema).is_valid(dict(r.call.arguments)):
            invalid += 1
    if failure == "malformed call":
        invalid += 1
    answer = result.output if result is not None else None
    right_calls, right, judged = _judge(case, tools, [by_step[k] for k in sorted(by_step)], answer)
    if failure is not None:
        right = False
    trace = result.trace if result is not None else []
    return Outcome(mode, case.kind, case.intent, case.prompt, right_calls, right, failure or judged,
                   [{"name": r.call.name, "arguments": r.call.arguments, "result": r.result.content[:200]}
                    for r in records], answer, invalid, len(records) + (failure == "malformed call"), len(trace),
                   sum(s.cost.canvases for s in trace), sum(s.cost.denoising_steps for s in trace),
                   [s.latency_s - s.tool_s for s in trace], seconds, case.phrasing)


def cases(n_single: int, n_multi: int, n_chat: int, seed: int, split: Split = "heldout") -> list[Case]:
    """Held-out cases: ``n_single`` single-call requests, ``n_multi`` multi-step ones (chains,
    parallel calls, a failing call), ``n_chat`` with no tool; deterministic for ``seed``.
    ``split="train"`` draws trained phrasings (with fresh values: the seed differs from
    training's), to tell memorised phrasing from generalisation."""
    want = {"single": n_single, "multi": n_multi, "answer": n_chat}
    out: list[Case] = []
    for conv in conversations(100 * (n_single + n_multi + n_chat) + 100, seed + 7_919 * (split == "train"), split):
        group = "single" if conv.kind == "single" else "answer" if conv.kind == "answer" else "multi"
        if want[group] > 0:
            want[group] -= 1
            out.append(Case.from_conversation(conv))
        if not any(want.values()):
            break
    return out


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    def rate(xs: Sequence[Outcome], attr: str) -> float | None:
        return sum(getattr(o, attr) for o in xs) / len(xs) if xs else None

    single = [o for o in outcomes if o.kind == "single"]
    multi = [o for o in outcomes if o.kind in ("chain", "parallel", "error")]
    turns = [t for o in outcomes for t in o.turn_seconds]
    n_calls = sum(o.n_calls for o in outcomes)
    return {
        "runs": len(outcomes),
        "single_exact_call": rate(single, "right_calls"), "single_right": rate(single, "right"),
        "multi_right": rate(multi, "right"),
        "by_kind": {k: {"n": len(xs), "right_calls": rate(xs, "right_calls"), "right": rate(xs, "right")}
                    for k in KINDS if (xs := [o for o in outcomes if o.kind == k])},
        "by_intent": {i: {"n": len(xs), "right_calls": rate(xs, "right_calls")}
                      for i in sorted({o.intent for o in single}) if (xs := [o for o in single if o.intent == i])},
        "by_phrasing": {p: {"n": len(xs), "intent": xs[0].intent, "right_calls": rate(xs, "right_calls")}
                        for p in sorted({o.phrasing for o in single if o.phrasing})
                        if (xs := [o for o in single if o.phrasing == p])},
        "calls": n_calls, "valid_calls": 1 - sum(o.invalid_calls for o in outcomes) / n_calls if n_calls else None,
        "steps_per_canvas": sum(o.denoising_steps for o in outcomes) / max(1, sum(o.canvases for o in outcomes)),
        "turn_ms_median": 1000 * statistics.median(turns) if turns else None,
        "turn_ms_mean": 1000 * statistics.fmean(turns) if turns else None,
        "failures": dict(Counter(o.failure for o in outcomes if o.failure).most_common()),
    }


@dataclass
class EvalConfig:
    model: str = "builtin"
    single: int = 300
    multi: int = 150
    chat: int = 30
    seed: int = 1
    modes: tuple[str, ...] = MODES
    max_steps: int = 6
    split: Split = "heldout"
    #: GenerationOptions fields over the model card's (e.g. {"t_max": 0.3})
    options: dict[str, Any] = field(default_factory=dict)


def evaluate(cfg: EvalConfig, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every case in every mode (modes interleaved per case, so machine noise hits all alike)."""
    from .builtin import BUILTIN_MODEL_DIR, card_options, demo_agent, demo_engine

    path = BUILTIN_MODEL_DIR if cfg.model == "builtin" else Path(cfg.model)
    engine = demo_engine(path)
    options = card_options(path, **cfg.options)
    agents = {m: demo_agent(path, engine=engine, max_steps=cfg.max_steps, keep_sessions=0, options=options,
                            copy_constraint=m in ("grounded", "copy"), grounded_numbers=m == "grounded",
                            constrained=m != "unconstrained") for m in cfg.modes}
    schemas = {t.name: t.parameters for t in next(iter(agents.values())).tools}
    todo = cases(cfg.single, cfg.multi, cfg.chat, cfg.seed, cfg.split)
    outcomes: list[Outcome] = []

    async def main() -> None:
        for i, case in enumerate(todo):
            for m in cfg.modes:
                agents[m].options = replace(agents[m].options, seed=cfg.seed * 100_003 + i)
                outcomes.append(await run_case(agents[m], case, m, schemas, cfg.seed + i))
            if progress:
                progress(case.prompt, i + 1, len(todo))

    t0 = time.perf_counter()
    anyio.run(main)
    n_params = sum(p.numel() for p in engine.model.parameters())
    return {
        "config": asdict(cfg), "model_path": str(path), "parameters": n_params, "options": asdict(options),
        "model_card": json.loads((path / "agentloop.json").read_text()) if (path / "agentloop.json").is_file() else {},
        "machine": machine_info(engine),
        "seconds": time.perf_counter() - t0,
        "modes": {m: summarize([o for o in outcomes if o.mode == m]) for m in cfg.modes},
        "outcomes": [asdict(o) for o in outcomes],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(res: dict[str, Any], command: str) -> str:
    modes = list(res["modes"])
    rows = [("single-call requests: exact call", "single_exact_call"),
            ("single-call requests: right end to end", "single_right"),
            ("multi-step runs: right end to end", "multi_right"),
            ("calls valid (jsonschema)", "valid_calls")]
    split = res["config"].get("split", "heldout")
    out = [f"# Demo model evaluation ({'held-out' if split == 'heldout' else 'trained'} phrasings)\n",
           f"`{command}` on {describe_machine(res['machine'])}; model `{res['model_path']}` ({res['parameters'] / 1e6:.1f}M parameters, "
           f"{res['model_card'].get('trained_steps', '?')} training steps); {res['config']['single']} single-call, "
           f"{res['config']['multi']} multi-step and {res['config']['chat']} chat cases; "
           f"{res['seconds'] / 60:.1f} min in all.\n",
           "| | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for label, key in rows:
        out.append(f"| {label} | " + " | ".join(_pct(res["modes"][m][key]) for m in modes) + " |")
    for k in KINDS:
        out.append(f"| kind `{k}`: right | " + " | ".join(
            _pct(res["modes"][m]["by_kind"].get(k, {}).get("right")) for m in modes) + " |")
    out.append("| denoising steps per canvas | " + " | ".join(
        f"{res['modes'][m]['steps_per_canvas']:.1f}" for m in modes) + " |")
    out.append("| model turn latency, median ms (CPU) | " + " | ".join(
        f"{res['modes'][m]['turn_ms_median']:.0f}" for m in modes) + " |")
    out.append("\n## Single-call exact rate by intent\n")
    out.append("| intent | " + " | ".join(modes) + " |")
    out.append("|---|" + "---|" * len(modes))
    for intent in res["modes"][modes[0]]["by_intent"]:
        out.append(f"| {intent} | " + " | ".join(
            _pct(res["modes"][m]["by_intent"].get(intent, {}).get("right_calls")) for m in modes) + " |")
    if split == "heldout" and res["modes"][modes[0]].get("by_phrasing"):
        out.append("\n## Single-call exact rate by held-out phrasing\n")
        out.append("Phrasings marked * are the newest, written before any model ran on them (the "
                   "training phrasings were never tuned against them).\n")
        out.append("| intent | phrasing | n | " + " | ".join(modes) + " |")
        out.append("|---|---|---|" + "---|" * len(modes))
        rows = res["modes"][modes[0]]["by_phrasing"]
        for p, r in sorted(rows.items(), key=lambda kv: (kv[1]["intent"], kv[0])):
            mark = "*" if p in ADDED_HELDOUT else ""
            out.append(f"| {r['intent']} | {p}{mark} | {r['n']} | " + " | ".join(
                _pct(res["modes"][m]["by_phrasing"].get(p, {}).get("right_calls")) for m in modes) + " |")
    out.append("\n## Failures by kind\n")
    for m in modes:
        f = res["modes"][m]["failures"]
        out.append(f"- **{m}**: " + (", ".join(f"{k}: {v}" for k, v in f.items()) if f else "none"))
    out.append("\n## Some failed runs (copy mode first)\n")
    shown = 0
    for o in sorted(res["outcomes"], key=lambda o: modes.index(o["mode"])):
        if not o["right"] and shown < 12:
            shown += 1
            calls = "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in o["calls"])
            out.append(f"- [{o['mode']}] {o['prompt']!r} -> {o['failure']}: {calls or 'no call'}; "
                       f"answer {str(o['answer'])[:80]!r}")
    return "\n".join(out) + "\n"


def write(res: dict[str, Any], out_dir: Path, command: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "demo_eval" if res["config"].get("split", "heldout") == "heldout" else "demo_eval_trained_phrasings"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps({**res, "command": command}, indent=1, ensure_ascii=False, default=str))
    paths["md"].write_text(markdown(res, command))
    return paths
