"""The ``agentloop`` command line.

    agentloop run "What is 12 mi in km?" --tools tools/demo.py   # one agent run
    agentloop chat --tools tools/demo.py                          # a conversation (REPL)
    agentloop tools tools/demo.py                                 # list tools and their schemas
    agentloop bench --quick                                       # loop latency against the alternatives
    agentloop train --out runs/demo                               # train the demo model (resumable)
    agentloop demo                      # the bundled model runs a few requests with the demo tools
    agentloop eval                      # the bundled model on held-out requests, four modes
    agentloop grammar check tools.json  # compile tool schemas, report sizes or the exact error
    agentloop precompile                # compile the numba kernels for this CPU now, in parallel

Exit codes: 0 success, 1 run error, 2 usage error.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from .errors import AgentloopError, KernelCompileError

DEMO_TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "Current weather and a forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"enum": ["metric", "imperial"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    {
        "name": "convert_units",
        "description": "Convert a quantity between units.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"enum": ["km", "mi", "kg", "lb", "C", "F"]},
                "to_unit": {"enum": ["km", "mi", "kg", "lb", "C", "F"]},
            },
            "required": ["value", "from_unit", "to_unit"],
            "additionalProperties": False,
        },
    },
]


class _Group(click.Group):
    """Exit 1 with the message (no traceback) for agentloop's own errors; click maps usage errors to 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentloopError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentloop")
def main() -> None:
    """agentloop: fast local tool-use loops on a block-diffusion LM, every call valid by construction."""


DEMO_PROMPTS = ("How is the weather in Berlin?", "What time is it in Tokyo?", "Convert 12 miles to km.")


@main.command()
@click.argument("prompts", nargs=-1)
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler (and of the random model).")
@click.option("--trace", is_flag=True, help="Print the per-step cost table of each run.")
@click.option("--random", "random_model", is_flag=True,
              help="Instead: denoise canvases with a tiny *random* DiffusionGemma, with and without the constraint.")
@click.option("--steps", default=8, show_default=True, help="With --random: denoising steps per canvas.")
@click.option("--canvas", "canvas_length", default=64, show_default=True, help="With --random: canvas length.")
def demo(prompts: tuple[str, ...], seed: int, trace: bool, random_model: bool, steps: int,
         canvas_length: int) -> None:
    """Run the bundled demo model on a few requests, with the demo tools (offline, CPU).

    Each request runs the real loop: the model's calls (valid by construction), the tools'
    results, the model's answer. Notes and files go to a scratch folder. Examples:

    \b
        agentloop demo
        agentloop demo "Weather in Lisbon for 3 days?" --trace
        agentloop demo --random --seed 3
    """
    _precompile_first_run()
    if random_model:
        _random_canvases(seed, steps, canvas_length)
        return
    import tempfile

    from .builtin import card_options, demo_agent

    with _progress("loading the bundled demo model"):
        agent = demo_agent(options=card_options(seed=seed))
        _ = agent.constraint
    with tempfile.TemporaryDirectory(prefix="agentloop-demo-") as sandbox:
        for prompt in prompts or DEMO_PROMPTS:
            click.echo(f"> {prompt}", err=True)
            compiling = _compile_seconds()
            result = agent.run_sync(prompt, deps=sandbox)
            _print_result(result, False, trace)
            u = result.usage
            note = _compiling_note(_compile_seconds() - compiling)
            click.echo(f"  ({u.steps} model steps, {u.denoising_steps} denoising steps, "
                       f"{u.forced_tokens} tokens forced, {1000 * result.total_s:.0f} ms{f', {note}' if note else ''})",
                       err=True)


def _random_canvases(seed: int, steps: int, canvas_length: int) -> None:
    """A random model cannot know what to call, yet every constrained canvas is a valid
    call for the demo tools, while the unconstrained argmax is noise."""
    from .engine import DiffusionEngine, GenerationOptions
    from .grammar import compile_tools

    engine = DiffusionEngine.random(canvas_length=canvas_length, seed=seed)
    t0 = time.perf_counter()
    # Calls only: a random model would otherwise often pick the (equally valid) text branch.
    grammar = compile_tools(DEMO_TOOLS, engine.tokenizer, "gemma4", allow_text=False)
    click.echo(f"compiled {len(DEMO_TOOLS)} tools in {1000 * (time.perf_counter() - t0):.0f} ms: {grammar.stats}")
    prompt = "<|turn>user\nWhat is the weather in Paris for 3 days?<turn|>\n<|turn>model\n"
    options = GenerationOptions(seed=seed, max_denoising_steps=steps, max_new_tokens=4 * canvas_length)
    for constraint in (None, grammar):
        out = engine.generate_sync(engine.session(prompt), constraint, options=options)
        c = out.cost
        click.echo(f"\n{'constrained' if constraint else 'unconstrained'}: {c.canvases} canvas(es), "
                   f"{c.denoising_steps} steps, {c.forced_tokens} tokens forced, {1000 * c.total_s:.0f} ms "
                   f"(decoder {1000 * c.decoder_s:.0f}, constraint {1000 * c.constraint_s:.0f}): {out.text[:160]!r}")
        if constraint is not None:
            click.echo(f"  parsed: {out.parsed}")
        else:
            stop = [out.stop_token] if out.finished else []
            click.echo(f"  valid call: {grammar.accepts(out.tokens + stop)}")


# ---- agents ---------------------------------------------------------------------------------------

_MODEL_HELP = ("builtin (the bundled demo model), random (a tiny random DiffusionGemma: valid calls, "
               "meaningless content) or a local checkpoint folder")


_INSTRUCTIONS = "You are a helpful assistant. Use the tools when they help."


def _agent_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--tools", "tool_specs", multiple=True, metavar="PATH[:NAME]",
                     help="Tools to offer: a .py file (all its @tool functions), FILE:NAME for one, or a module. "
                          "Repeatable."),
        click.option("--model", default="builtin", show_default=True, help=_MODEL_HELP),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True),
        click.option("--max-steps", default=10, show_default=True, type=click.IntRange(1),
                     help="Most model calls per run."),
        click.option("--max-denoising-steps", default=48, show_default=True, type=click.IntRange(1),
                     help="Most denoising steps per canvas."),
        click.option("--instructions", default=None,
                     help="The system instructions (default: the model's own, else a generic helpful assistant)."),
        click.option("--seed", type=int, default=None, help="Seed of the sampler (default: random)."),
    ]):
        f = opt(f)
    return f


_compile_clock: Any = None


def _compile_seconds() -> float:
    """Seconds numba has spent compiling kernels in this process since the first call.

    A first run on a machine compiles agentloop's kernels for its CPU (~43 s on a 2-core
    x86 machine); numba keeps them in its on-disk cache, and later runs load them in
    well under a second. The CLI says how much of a slow step was that, so that a
    first request's time is not read as the loop's."""
    global _compile_clock
    if _compile_clock is None:
        from numba.core import event

        _compile_clock = event.TimingListener()  # (nested compiles counted once: it tracks depth)
        event.register("numba:compile", _compile_clock)
    return float(_compile_clock.duration) if _compile_clock.done else 0.0


def _compiling_note(seconds: float) -> str:
    """What a time shown beside it owes to compiling kernels (nothing under half a second)."""
    return f"{seconds:.1f} s of it compiling kernels: first run only, cached after" if seconds >= 0.5 else ""


def _precompile(demo_only: bool, processes: int | None = None, note: str = "") -> Any:
    """Compile the recorded kernels numba's cache lacks (those the demo calls, with
    ``demo_only``) in parallel processes before their first calls (``agentloop.precompile``),
    under a progress line (``note`` after it); -> its ``PrecompileReport``, None where
    nothing was missing."""
    from .precompile import default_processes, kernel_count, missing_kernels, precompile_kernels, recorded_kernels

    kernels = recorded_kernels()
    missing = missing_kernels([k for k in kernels if k.demo or not demo_only])
    if not missing:
        return None
    processes = min(processes or default_processes(), len(missing))
    with _progress(f"compiling {kernel_count(missing)} numba kernels for this CPU in {processes} process(es){note}",
                   compile_note=False):
        return precompile_kernels(missing, processes)


def _precompile_first_run() -> None:
    """Before the commands that run the loop (demo, run, chat): on a first run, the
    kernels it calls compile in parallel; a failure here only costs time (they compile
    at their first calls instead), so any error here is a warning."""
    try:
        _precompile(demo_only=True, note=" (first run only, cached after)")
    except Exception as e:
        detail = str(e) if isinstance(e, KernelCompileError) else f"{type(e).__name__}: {e}"
        click.echo(f"warning: precompiling kernels failed, they compile at their first calls instead: {detail}",
                   err=True)


@contextmanager
def _progress(message: str, compile_note: bool = True) -> Iterator[None]:
    """A spinner on stderr while something slow (loading a model) runs; with
    ``compile_note`` the time it spent compiling kernels is named."""
    done = threading.Event()
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()

    def spin() -> None:
        for ch in itertools.cycle("|/-\\"):
            if done.wait(0.1):
                return
            click.echo(f"\r{message} {ch}", nl=False, err=True)

    th = threading.Thread(target=spin, daemon=True) if tty else None
    if th:
        th.start()
    else:
        click.echo(f"{message} ...", err=True)
    compiling = _compile_seconds()  # (the first call imports numba: after the message)
    finished = False
    try:
        yield
        finished = True
    finally:
        done.set()
        if th:
            th.join()
        note = _compiling_note(_compile_seconds() - compiling) if compile_note else ""
        click.echo(f"{chr(13) if tty else ''}{message}: {'done in' if finished else 'stopped after'} "
                   f"{time.perf_counter() - t0:.1f} s{f' ({note})' if note else ''}", err=True)


def _make_agent(tool_specs: tuple[str, ...], model: str, device: str, dtype: str, max_steps: int,
                max_denoising_steps: int, instructions: str | None, seed: int | None) -> Any:
    from .agent import Agent
    from .engine import DiffusionEngine, GenerationOptions
    from .builtin import BUILTIN_MODEL_DIR, card_options, demo_agent, demo_engine, model_card
    from .tools import load_tools

    tools = [t for spec in tool_specs for t in load_tools(spec)]
    _precompile_first_run()
    options = GenerationOptions(max_denoising_steps=max_denoising_steps, seed=seed)
    if model == "builtin":
        if not (BUILTIN_MODEL_DIR / "config.json").is_file():
            raise click.UsageError("the bundled demo model is not in this installation; use --model random "
                                   "(a tiny random DiffusionGemma) or --model PATH (a local checkpoint)")
        model = str(BUILTIN_MODEL_DIR)
    if model_card(model):  # a model agentloop trained: run it as it was trained (its tools, its sampler)
        options = card_options(model, max_denoising_steps=max_denoising_steps, seed=seed)
        with _progress(f"loading model {model}"):
            agent = demo_agent(model, engine=demo_engine(model, device=device, dtype=dtype), tools=tools or None,
                               max_steps=max_steps, options=options,
                               **({"instructions": instructions} if instructions else {}))
            _ = agent.constraint
        return agent
    with _progress(f"loading model {model}"):
        if model == "random":
            engine = DiffusionEngine.random(device=device, dtype=dtype)
        else:
            if not Path(model).is_dir():
                raise click.BadParameter(f"{model!r} is not a folder (expected {_MODEL_HELP})", param_hint="--model")
            engine = DiffusionEngine.from_pretrained(model, device=device, dtype=dtype)
    with _progress(f"compiling the grammar of {len(tools)} tool(s)"):
        agent = Agent(engine, tools, instructions=instructions or _INSTRUCTIONS, max_steps=max_steps, options=options)
        _ = agent.constraint
    return agent


def _result_json(result: Any) -> dict[str, Any]:
    return {"output": result.output,
            "calls": [{"step": c.step, "name": c.call.name, "arguments": c.call.arguments,
                       "result": c.result.content, "is_error": c.result.is_error} for c in result.calls],
            "usage": result.usage.__dict__, "total_s": result.total_s, "trace": result.trace_dicts()}


def _trace_table(result: Any) -> str:
    cols = ["step", "prefill", "canvases", "steps", "forced", "tokens", "encoder ms", "decoder ms",
            "constraint ms", "sampler ms", "tools ms", "turn ms", "calls"]
    rows = [[str(s.step), str(s.cost.prefill_tokens), str(s.cost.canvases), str(s.cost.denoising_steps),
             str(s.cost.forced_tokens), str(s.cost.generated_tokens), f"{1000 * s.cost.encoder_s:.0f}",
             f"{1000 * s.cost.decoder_s:.0f}", f"{1000 * s.cost.constraint_s:.0f}",
             f"{1000 * s.cost.sampler_s:.0f}", f"{1000 * s.tool_s:.0f}", f"{1000 * s.latency_s:.0f}",
             ",".join(s.calls) or ("(answer)" if s.final else "")] for s in result.trace]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols)] + [fmt.format(*r) for r in rows])


def _print_result(result: Any, as_json: bool, trace: bool) -> None:
    if as_json:
        click.echo(json.dumps(_result_json(result), ensure_ascii=False, default=str))
        return
    for c in result.calls:
        mark = "error" if c.result.is_error else "ok"
        click.echo(f"  [{c.step}] {c.call.name}({json.dumps(c.call.arguments, ensure_ascii=False)}) -> {mark}: "
                   f"{c.result.content[:200]}", err=True)
    click.echo(result.output)
    if trace:
        click.echo(_trace_table(result), err=True)


@main.command()
@click.argument("prompt")
@_agent_options
@click.option("--json", "as_json", is_flag=True, help="Print the result (output, calls, usage, trace) as JSON.")
@click.option("--trace", is_flag=True, help="Print the per-step cost table (to stderr).")
def run(prompt: str, tool_specs: tuple[str, ...], model: str, device: str, dtype: str, max_steps: int,
        max_denoising_steps: int, instructions: str | None, seed: int | None, as_json: bool, trace: bool) -> None:
    """Run an agent on PROMPT until it answers. Examples:

    \b
        agentloop run "What is 12 mi in km?" --tools tools/demo.py
        agentloop run "Weather in Oslo?" --tools tools/demo.py:get_weather --trace
        agentloop run "Hi" --model /models/diffusiongemma --device cuda --dtype bfloat16 --json
    """
    from .errors import MaxStepsExceeded, ToolRetriesExhausted

    agent = _make_agent(tool_specs, model, device, dtype, max_steps, max_denoising_steps, instructions, seed)
    compiling = _compile_seconds()
    try:
        result = agent.run_sync(prompt)
    except (MaxStepsExceeded, ToolRetriesExhausted) as e:
        if as_json and e.partial is not None:
            click.echo(json.dumps({"error": str(e), **_result_json(e.partial)}, ensure_ascii=False, default=str))
        elif trace and e.partial is not None:
            click.echo(_trace_table(e.partial), err=True)
        raise
    _print_result(result, as_json, trace)
    note = _compiling_note(_compile_seconds() - compiling)
    if note:
        click.echo(f"(the run took {result.total_s:.1f} s, {note})", err=True)


@main.command()
@_agent_options
@click.option("--trace", is_flag=True, help="Print the per-step cost table after each answer.")
def chat(tool_specs: tuple[str, ...], model: str, device: str, dtype: str, max_steps: int, max_denoising_steps: int,
         instructions: str | None, seed: int | None, trace: bool) -> None:
    """A conversation with an agent; the session (and its KV cache) is kept between turns.

    Type a message and press enter; /reset starts over, /trace shows the last turn's cost
    table, /exit (or end of input) quits. Example:

        agentloop chat --tools tools/demo.py --model random
    """
    agent = _make_agent(tool_specs, model, device, dtype, max_steps, max_denoising_steps, instructions, seed)
    history = None
    last = None
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = None
            click.echo("(new conversation)")
            continue
        if line == "/trace":
            click.echo(_trace_table(last) if last is not None else "(no turn yet)")
            continue
        compiling = _compile_seconds()
        try:
            last = agent.run_sync(line, message_history=history)
        except AgentloopError as e:
            click.echo(f"error: {e}", err=True)
            continue
        history = last.messages
        _print_result(last, False, trace)
        note = _compiling_note(_compile_seconds() - compiling)
        if note:
            click.echo(f"(the turn took {last.total_s:.1f} s, {note})", err=True)


@main.command("tools")
@click.argument("specs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the tools as JSON (name, description, parameters).")
def tools_cmd(specs: tuple[str, ...], as_json: bool) -> None:
    """List the tools in SPECS (files, FILE:NAME or modules) with their JSON Schemas, and
    where the grammar generates fewer argument values than a schema allows.

    Exits with 1 and the exact reason when a tool cannot be defined. Example:

        agentloop tools tools/demo.py tools/web.py
    """
    from .tools import load_tools

    found = [t for spec in specs for t in load_tools(spec)]
    if as_json:
        click.echo(json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                               for t in found], indent=1, ensure_ascii=False))
        return
    for t in found:
        flags = [f"timeout {t.timeout:g} s" if t.timeout else "no timeout", f"retries {t.retries}"]
        if t.requires_approval:
            flags.append("requires approval")
        click.echo(f"{t.name}: {t.description}  ({', '.join(flags)})")
        click.echo("  " + json.dumps(t.parameters, ensure_ascii=False))
        for n in t.narrowings:
            click.echo(f"  narrowed at {n}")


@main.command("bench")
@click.option("--model", default="random", show_default=True,
              help="builtin, random (tiny DiffusionGemma), or a local checkpoint folder.")
@click.option("--random-weights", type=click.Choice(["diffusiongemma-26b-a4b"]), default=None,
              help="Build this architecture with random weights (speed only; say so in the results).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--steps", default=16, show_default=True, type=click.IntRange(0),
              help="Fixed denoising steps per canvas (0: adaptive stopping; random weights never stop early).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--scenario", "only", multiple=True, help="Run only scenarios whose name starts with this.")
@click.option("--quick", is_flag=True, help="Smaller scenarios (a 6-turn long session, no 20-tool set).")
@click.option("--domain", type=click.Choice(["auto", "demo", "realistic"]), default="auto", show_default=True,
              help="Tools and conversations: the demo tools (what the bundled model knows), 20 realistic schemas, "
                   "or auto (demo for a model agentloop trained).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Folder for loop.json, loop.md and loop.png (loop-<name>.* with --name).")
@click.option("--name", default=None, help="Suffix of the result files, e.g. builtin -> loop-builtin.json.")
def bench_cmd(model: str, random_weights: str | None, device: str, dtype: str, steps: int, repeats: int,
              only: tuple[str, ...], quick: bool, domain: str, out: Path, name: str | None) -> None:
    """Measure one agent-loop turn: agentloop against the unconstrained model (parse and
    retry), a grammar-constrained autoregressive model and agentloop without its session
    cache, interleaved, on single calls, a chain, parallel calls, an answer and a long session.

    \b
        agentloop bench --quick                                       # tiny random model, CPU, minutes
        agentloop bench --model builtin --steps 0 --name builtin      # the bundled model, adaptive stopping
        agentloop bench --model /models/dg --device cuda --dtype bfloat16 --steps 0
        agentloop bench --random-weights diffusiongemma-26b-a4b --device cuda --dtype bfloat16 --scenario single
    """
    from .benchmark import BenchConfig, print_table, run, write

    cfg = BenchConfig(model=f"random:{random_weights}" if random_weights else model, device=device, dtype=dtype,
                      steps=steps, repeats=repeats, quick=quick, only=only, domain=domain)
    res = run(cfg, log=lambda m: click.echo(m, err=True))
    command = "agentloop bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "agentloop bench"
    paths = write(res, out, command, name=name)
    print_table(res)
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)


@main.command("train")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Run folder: checkpoints, loss.png, train.json and the exported model/.")
@click.option("--steps", default=None, type=int,
              help="Optimizer steps of the first cosine cycle [default: 7000].")
@click.option("--restart-steps", default=3000, show_default=True,
              help="Steps of each cycle after --steps (a warm restart to --restart-lr).")
@click.option("--restarts", default=3, show_default=True,
              help="How many restart cycles. More of them on a finished run's folder continue that run.")
@click.option("--restart-lr", default=1e-3, show_default=True)
@click.option("--minutes", default=None, type=float, help="Stop this invocation after so many minutes (resumable).")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--hidden-size", default=128, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--space-prefix/--split-spaces", default=True, show_default=True,
              help="Tokenizer: words carry their leading space, or every space is a token of its own.")
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda when there is one), cpu, cuda, cuda:1... The data and noise are the same on any.")
def train_cmd(out: Path, steps: int | None, restart_steps: int, restarts: int, restart_lr: float,
              minutes: float | None, seed: int,
              batch_size: int, hidden_size: int, layers: int, space_prefix: bool, device: str) -> None:
    """Train the demo model on synthetic tool-use conversations (reproducible from --seed).

    The bundled model is `agentloop train --device cpu` with the other defaults (about
    4 h on 2 CPU cores; on a GPU the same data and noise, rounded differently). Run it
    again with the same --out to resume from the last checkpoint (the run keeps its first
    flags, except that --restarts may add cycles to it). Example:

        agentloop train --out runs/demo --minutes 60     # then again, until it reports done
    """
    import torch

    from .training.train import TrainConfig, train

    cfg = TrainConfig(seed=seed, batch_size=batch_size, hidden_size=hidden_size, layers=layers,
                      space_prefix=space_prefix, restart_steps=restart_steps, restarts=restarts,
                      restart_lr=restart_lr)
    if steps is not None:
        cfg.max_steps = steps
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = train(out, cfg, minutes, log=lambda m: click.echo(m, err=True), device=device)
    click.echo(f"model written to {folder}")


@main.command("eval")
@click.option("--model", default="builtin", show_default=True, help="builtin, or a folder `agentloop train` wrote.")
@click.option("--single", default=300, show_default=True, help="Held-out single-call requests.")
@click.option("--multi", default=150, show_default=True, help="Held-out multi-step runs (chains, parallel, errors).")
@click.option("--chat", default=30, show_default=True, help="Held-out requests that need no tool.")
@click.option("--modes", default=",".join(("grounded", "copy", "grammar", "unconstrained")), show_default=True,
              help="Comma-separated: grounded (copy + answer numbers from the conversation, as the demo runs), "
                   "copy (grammar + copy constraint), grammar, unconstrained (parse the text).")
@click.option("--seed", default=1, show_default=True)
@click.option("--split", type=click.Choice(["heldout", "train"]), default="heldout", show_default=True,
              help="heldout: phrasings never trained on; train: trained phrasings with fresh values.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A sampler setting over the model card's, e.g. t_max=0.3 or entropy_bound=0.02. Repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True)
def eval_cmd(model: str, single: int, multi: int, chat: int, modes: str, seed: int, split: str,
             options: tuple[str, ...], out: Path) -> None:
    """Evaluate the demo model on held-out requests through the real loop and tools.

    Reports right calls and right runs end to end per mode, calls valid by jsonschema,
    denoising steps per canvas, turn latency, and failures by kind; writes
    demo_eval.{json,md} to --out. Example:

        agentloop eval --single 20 --multi 10 --modes copy,unconstrained
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation import MODES, EvalConfig, evaluate, markdown, write

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in chosen if m not in MODES]
    if bad or not chosen:
        raise click.BadParameter(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}", param_hint="--modes")
    overrides: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = EvalConfig(model=model, single=single, multi=multi, chat=chat, seed=seed, modes=chosen, options=overrides,
                     split=split)  # type: ignore[arg-type]
    with Progress(TextColumn("cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=None) as bar:
        task = bar.add_task("", total=single + multi + chat)
        res = evaluate(cfg, progress=lambda prompt, i, n: bar.update(task, completed=i, description=prompt[:40]))
    command = "agentloop eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else "agentloop eval"
    paths = write(res, out, command)
    click.echo(markdown(res, command))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)


@main.group()
def grammar() -> None:
    """Compile and inspect canvas grammars."""


@grammar.command("check")
@click.argument("tools_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wire-format", default="gemma4", show_default=True, help="A name in grammars/ or a .toml path.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A tokenizer.json (default: a built-in byte-level tokenizer).")
@click.option("--alias", "aliases", multiple=True, metavar="SPECIAL=TOKEN",
              help="Map a wire-format special token onto a token the tokenizer has.")
def grammar_check(tools_file: Path, wire_format: str, tokenizer_path: Path | None, aliases: tuple[str, ...]) -> None:
    """Compile the tools in TOOLS_FILE (a JSON list of {name, description, parameters}).

    Prints the automaton's size and compile time and where it generates fewer argument
    values than a schema allows, or the exact keyword and JSON pointer
    the compiler cannot represent. Example:

        agentloop grammar check agentloop/data/tool_schemas.json --wire-format json
    """
    from tokenizers import Tokenizer

    from .grammar import byte_tokenizer, check_schema, compile_tools

    try:
        tools = json.loads(tools_file.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise click.UsageError(f"{tools_file} is not JSON: {e}") from None
    alias_map = {}
    for a in aliases:
        if "=" not in a:
            raise click.UsageError(f"--alias {a!r}: expected SPECIAL=TOKEN")
        k, v = a.split("=", 1)
        alias_map[k] = v
    tok = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path else byte_tokenizer()
    try:
        g = compile_tools(tools if isinstance(tools, list) else [tools], tok, wire_format, aliases=alias_map)
    except AgentloopError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    s = g.stats
    click.echo(f"{len(g.tools)} tools, wire format {g.wire_format.name}, vocab {s.vocab_size}: "
               f"{s.dfa_states} states, {s.atoms} token classes, {s.groups} groups, {s.edges} edges, "
               f"{s.nbytes / 1e6:.1f} MB, compiled in {s.compile_seconds:.2f} s")
    for t in g.tools:  # (the arguments as compile_tools reads them: an object)
        for n in check_schema({**t.parameters, "type": "object"}, g.wire_format):
            click.echo(f"{t.name}: narrowed at {n}")


@main.command("precompile")
@click.option("--processes", type=click.IntRange(1), default=None, help="Processes to share the kernels over "
              "(default: one per CPU, at most 8).")
@click.option("--demo-only", is_flag=True, help="Only the kernels `agentloop demo` calls.")
def precompile_cmd(processes: int | None, demo_only: bool) -> None:
    """Compile agentloop's numba kernels for this CPU into numba's disk cache, in parallel.

    Each kernel otherwise compiles at its first call, one after another: ~40 s of a
    fresh install's first run on a 2-core machine (which compiles the kernels the demo
    calls first), and up to ~70 s more at a run's first step whose weight leaves
    float64's range (the model sure of a text answer where a call is forced, at a low
    temperature). Run this once after installing (in an image's build, say); it
    compiles only what the cache lacks. Example:

    \b
        agentloop precompile
    """
    import numba

    if numba.config.DISABLE_JIT:
        click.echo("nothing to compile: numba's JIT is disabled (NUMBA_DISABLE_JIT), the kernels run as Python")
        return
    report = _precompile(demo_only, processes)
    if report is None:
        click.echo("nothing to compile: numba's cache holds every recorded kernel")
    else:
        click.echo(f"compiled {report.compiled} kernels in {report.processes} process(es), {report.seconds:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
