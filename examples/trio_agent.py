"""The same agent under trio: agentloop is written against anyio, so it runs on asyncio or trio.

    python examples/trio_agent.py
"""

from __future__ import annotations

import trio

from agentloop import Agent, CanvasDraft, FinalAnswer, ToolCallEnd, load_tools
from agentloop.engine import DiffusionEngine, GenerationOptions


async def main() -> None:
    engine = DiffusionEngine.random(canvas_length=64)  # or DiffusionEngine.from_pretrained(PATH)
    agent = Agent(engine, load_tools("tools/demo.py:get_weather"), max_steps=2,
                  options=GenerationOptions(seed=0, max_denoising_steps=4, max_new_tokens=128))
    drafts = 0
    try:
        async for event in agent.stream("Weather in Lima for 2 days?"):
            if isinstance(event, CanvasDraft):
                drafts += 1
            elif isinstance(event, ToolCallEnd):
                print("tool:", event.call.name, "->", event.result.content[:60])
            elif isinstance(event, FinalAnswer):
                print("answer:", repr(event.text[:60]))
    except Exception as e:  # a random model may keep calling until max_steps
        print("ended:", type(e).__name__)
    print(f"{drafts} live canvas drafts under trio")


if __name__ == "__main__":
    trio.run(main)
