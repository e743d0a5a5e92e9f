"""A plain synchronous script: ``run_sync`` starts and stops the event loop for you.

    python examples/sync_script.py
"""

from __future__ import annotations

from agentloop import Agent, MaxStepsExceeded, tool
from agentloop.engine import DiffusionEngine, GenerationOptions


@tool
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


engine = DiffusionEngine.random(canvas_length=64)  # or DiffusionEngine.from_pretrained(PATH)
agent = Agent(engine, [word_count], max_steps=3, options=GenerationOptions(seed=3, max_denoising_steps=4,
                                                                           max_new_tokens=128))
try:
    result = agent.run_sync("How many words are in 'the quick brown fox'?")
    print("answer:", repr(result.output[:80]))
except MaxStepsExceeded as e:  # a random model may keep calling
    result = e.partial
    print("no answer within max_steps")
for c in result.calls:
    print("call:", c.call.name, c.call.arguments, "->", c.result.content)
print("usage:", result.usage)
