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
    import torch

    from .grammar import byte_tokenizer, compile_tools

    tok = byte_tokenizer()
    t0 = time.perf_counter()
    # Calls only: a random model would otherwise often pick the (equally valid) text branch.
    grammar = compile_tools(DEMO_TOOLS, tok, "gemma4", allow_text=False)
    click.echo(f"compiled {len(DEMO_TOOLS)} tools in {1000 * (time.perf_counter() - t0):.0f} ms: {grammar.stats}")
    model = _tiny_random_model(tok.get_vocab_size(), seed)
    prompt = "<|turn>user\nWhat is the weather in Paris for 3 days?<turn|>\n<|turn>model\n"
    input_ids = torch.tensor([tok.encode(prompt).ids])
    gen = torch.Generator().manual_seed(seed)
    for constrained in (False, True):
        canvas = torch.randint(0, tok.get_vocab_size(), (1, canvas_length), generator=gen)
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                logits = model(input_ids=input_ids, decoder_input_ids=canvas).logits[0]
            if constrained:
                step = grammar.denoise_step(logits, generator=gen)
                canvas = torch.tensor([step.sample])
                final = step.argmax
            else:
                canvas = torch.multinomial(logits.softmax(-1), 1, generator=gen).T
                final = logits.argmax(-1).tolist()
        ms = 1000 * (time.perf_counter() - t0)
        text = tok.decode(final, skip_special_tokens=False)
        click.echo(f"\n{'constrained' if constrained else 'unconstrained'} ({steps} steps, {ms:.0f} ms): {text[:160]!r}")
        if constrained:
            click.echo(f"  parsed: {grammar.parse(final)}")
        else:
            click.echo(f"  valid: {grammar.accepts(final)}")


def _tiny_random_model(vocab_size: int, seed: int) -> Any:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4, top_k_experts=2,
                moe_intermediate_size=64, sliding_window=64, max_position_embeddings=2048,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    vision = dict(model_type="gemma4_vision", num_hidden_layers=0, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=None, eoi_token_id=None,
                               image_token_id=None)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


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
