"""Constrain one canvas of logits to a tool schema, offline, in a few lines.

    python examples/constrain_a_canvas.py
"""

import torch

from agentloop.grammar import byte_tokenizer, compile_tools

tools = [{
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}]

tokenizer = byte_tokenizer()
grammar = compile_tools(tools, tokenizer, wire_format="gemma4", allow_text=False)
logits = torch.randn(48, tokenizer.get_vocab_size(), generator=torch.Generator().manual_seed(0))

step = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
print("argmax canvas :", tokenizer.decode(step.argmax, skip_special_tokens=False))
print("parsed        :", grammar.parse(step.argmax))
print("forced tokens :", sum(t >= 0 for t in grammar.forced_tokens(48)), "of 48 positions")
print("mean entropy  :", float(step.entropy.mean()))
