"""The demo model's targets over several case draws, pooled, with their 95% intervals.

One draw of 300 single-call cases (``agentloop eval``) pins a rate to about +-3.5 points,
and draws differ by more than that: the held-out phrasing mix decides much (seeds 1-4
gave 87-93% exact calls for one model). The targets (>= 90% exact single calls, >= 80%
multi-step runs right, held-out phrasings) are judged here on the pooled draws. Only the
summaries are written (each draw's cases are what ``agentloop eval --seed N`` reports in
full)::

    python bench/eval_draws.py                       # seeds 1-4, grounded mode (~5 min)
    python bench/eval_draws.py --seeds 1 2 --modes grounded,grammar
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from agentloop.benchmark import describe_machine
from agentloop.evaluation import MODES, EvalConfig, Outcome, evaluate, summarize

TARGETS = {"single_exact_call": 0.90, "multi_right": 0.80}
MULTI_KINDS = ("chain", "parallel", "error")  # the kinds summarize() counts as multi-step runs


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% by default)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def pooled(draws: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The evaluation's own summary of every draw's outcomes in ``mode`` together, with
    counts and intervals for the target rates."""
    s = summarize([Outcome(**o) for d in draws for o in d["outcomes"] if o["mode"] == mode])
    kinds = s["by_kind"]
    n_single = kinds.get("single", {}).get("n", 0)
    n_multi = sum(kinds[k]["n"] for k in MULTI_KINDS if k in kinds)
    rates = {}
    for key, n in (("single_exact_call", n_single), ("single_right", n_single), ("multi_right", n_multi)):
        k = round(s[key] * n) if n else 0  # summarize's rates are counts over n
        rates[key] = {"k": k, "n": n, "rate": s[key], "ci95": wilson(k, n)}
    return {"rates": rates, "by_intent": s["by_intent"], "failures": s["failures"]}


def run(seeds: Sequence[int], modes: Sequence[str], single: int, multi: int, model: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    draws = []
    for s in seeds:
        draws.append(evaluate(EvalConfig(model=model, single=single, multi=multi, chat=0, seed=s, modes=tuple(modes))))
        g = draws[-1]["modes"][modes[0]]
        print(f"seed {s}: {modes[0]} exact single {g['single_exact_call']:.3f}, multi right {g['multi_right']:.3f}",
              file=sys.stderr)
    return {
        "config": {"seeds": list(seeds), "modes": list(modes), "single": single, "multi": multi, "model": model},
        "machine": draws[0]["machine"], "model_card": draws[0]["model_card"], "seconds": time.perf_counter() - t0,
        "per_draw": [{"seed": s, **{m: {k: d["modes"][m][k] for k in ("single_exact_call", "single_right",
                                                                         "multi_right", "turn_ms_median")}
                                     for m in modes}} for s, d in zip(seeds, draws)],
        "pooled": {m: pooled(draws, m) for m in modes},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def markdown(res: dict[str, Any], command: str) -> str:
    cfg = res["config"]
    card = res["model_card"]
    lines = ["# Demo model over several case draws (held-out phrasings)", "",
             f"`{command}` on {describe_machine(res['machine'])}; model {cfg['model']} "
             f"({card.get('trained_steps', '?')} training steps); seeds {', '.join(map(str, cfg['seeds']))}, "
             f"{cfg['single']} single-call and {cfg['multi']} multi-step cases each; {res['seconds'] / 60:.1f} min.", "",
             "| mode | rate | pooled | 95% interval | target | " + " | ".join(f"seed {s}" for s in cfg["seeds"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(cfg["seeds"])]
    names = {"single_exact_call": "single-call requests: exact call", "single_right": "single-call requests: right "
             "end to end", "multi_right": "multi-step runs: right end to end"}
    for m in cfg["modes"]:
        for key, name in names.items():
            r = res["pooled"][m]["rates"][key]
            lo, hi = r["ci95"]
            target = ""
            if key in TARGETS:
                met = r["rate"] is not None and r["rate"] >= TARGETS[key]
                target = f">= {TARGETS[key]:.0%}: " + ("met" + (", whole interval" if lo >= TARGETS[key] else "")
                                                       if met else "not met")
            lines.append(f"| {m} | {name} | **{_pct(r['rate'])}** ({r['k']}/{r['n']}) | {_pct(lo)} - {_pct(hi)} | "
                         f"{target} | " + " | ".join(_pct(d[m][key]) for d in res["per_draw"]) + " |")
    for m in cfg["modes"]:
        p = res["pooled"][m]
        lines += ["", f"## {m}: exact single calls by intent, pooled", "",
                  "| intent | n | exact |", "|---|---|---|"]
        lines += [f"| {i} | {v['n']} | {_pct(v['right_calls'])} |" for i, v in p["by_intent"].items()]
        lines += ["", f"Failures ({m}, single and multi-step): " +
                  ", ".join(f"{k}: {v}" for k, v in p["failures"].items())]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--modes", default="grounded", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--multi", type=int, default=150)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    res = run(args.seeds, modes, args.single, args.multi, args.model)
    command = "python bench/eval_draws.py" + ("" if argv is None and len(sys.argv) == 1 else
                                               " " + " ".join(sys.argv[1:] if argv is None else argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_eval_draws.json").write_text(json.dumps({**res, "command": command}, indent=1))
    md = markdown(res, command)
    (args.out / "demo_eval_draws.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
