"""Drive the engine directly: a session across two turns, a constrained tool call, the cost record.

Runs offline on a CPU in a few seconds with a tiny *random* DiffusionGemma (its arguments
are noise, but always valid ones). Swap in a real checkpoint with
``DiffusionEngine.from_pretrained("/path/to/diffusiongemma", device="cuda", dtype="bfloat16")``.

    python examples/engine_session.py
"""

from __future__ import annotations

import anyio

from agentloop.engine import DiffusionEngine, GenerationOptions
from agentloop.grammar import compile_tools

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False},
}


async def main() -> None:
    engine = DiffusionEngine.random(canvas_length=64)
    calls = compile_tools([WEATHER], engine.tokenizer, "gemma4", allow_text=False, parallel_calls=False)
    session = engine.session("<|turn>user\nWeather in Oslo?<turn|>\n<|turn>model\n")
    options = GenerationOptions(seed=0, max_new_tokens=256)

    out = await engine.generate(session, calls, options=options)
    print("call:", out.parsed.calls[0], "| cost:", out.cost)

    # The stop token (<|tool_response>) is not in the session: the response segment starts with it.
    session.append_text('<|tool_response>response:get_weather{value:<|"|>4 C, snow<|"|>}<tool_response|>')
    out = await engine.generate(session, options=options)  # unconstrained, encodes only the new tokens
    print("prefilled this turn:", out.cost.prefill_tokens, "of", len(session), "tokens in the session")


if __name__ == "__main__":
    anyio.run(main)
