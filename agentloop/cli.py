"""The ``agentloop`` command line.

    agentloop demo                      # constrained canvases from a tiny random DiffusionGemma
    agentloop grammar check tools.json  # compile tool schemas, report sizes or the exact error

Exit codes: 0 success, 1 run error, 2 usage error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import AgentloopError

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentloop")
def main() -> None:
    """agentloop: fast local tool-use loops on a block-diffusion LM, every call valid by construction."""


@main.command()
@click.option("--seed", default=0, show_default=True, help="Seed of the random model and the sampler.")
@click.option("--steps", default=8, show_default=True, help="Denoising steps per canvas.")
@click.option("--canvas", "canvas_length", default=64, show_default=True, help="Canvas length in tokens.")
def demo(seed: int, steps: int, canvas_length: int) -> None:
    """Denoise canvases with a tiny *random* DiffusionGemma, with and without the constraint.

    Offline and on the CPU. A random model cannot know what to call, yet every
    constrained canvas is a valid call (or a final text) for the demo tools, while the
    unconstrained argmax is noise. Example:

        agentloop demo --seed 3
    """
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

    Prints the automaton's size and compile time, or the exact keyword and JSON pointer
    the compiler cannot represent. Example:

        agentloop grammar check tests/data/tool_schemas.json --wire-format json
    """
    from tokenizers import Tokenizer

    from .grammar import byte_tokenizer, compile_tools

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


if __name__ == "__main__":  # pragma: no cover
    main()
