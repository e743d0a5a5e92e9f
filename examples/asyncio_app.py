"""An agent inside an existing asyncio application: a tiny HTTP service, one agent run per
request, every request sharing one engine (calls queue on it; the event loop stays free).

    python examples/asyncio_app.py              # serve on http://127.0.0.1:8765/ask?q=...
    python examples/asyncio_app.py --self-test  # start, send 3 concurrent requests, stop

Uses a tiny random DiffusionGemma so it runs anywhere in seconds (answers are noise, calls
are valid); pass a checkpoint folder as the first argument to use a real model.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from agentloop import Agent, load_tools
from agentloop.engine import DiffusionEngine, GenerationOptions

ROOT = Path(__file__).resolve().parent.parent


def make_engine(argv: list[str]) -> DiffusionEngine:
    paths = [a for a in argv if not a.startswith("--")]
    if paths:
        return DiffusionEngine.from_pretrained(paths[0])
    return DiffusionEngine.random(canvas_length=64)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, engine: DiffusionEngine) -> None:
    request = (await reader.readline()).decode()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # headers
    try:
        _, target, _ = request.split(" ", 2)
        question = parse_qs(urlparse(target).query).get("q", [""])[0]
        # One agent per request: its own tools and conversation, the shared engine.
        agent = Agent(engine, load_tools(str(ROOT / "tools/demo.py:calculator")), max_steps=2,
                      options=GenerationOptions(max_denoising_steps=4, max_new_tokens=64))
        try:
            result = await agent.run(question)
            body = {"answer": result.output, "calls": len(result.calls), "seconds": round(result.total_s, 3)}
        except Exception as e:  # a run that cannot finish is a 200 with the reason, not a dead server
            body = {"error": f"{type(e).__name__}: {e}"}
        payload, status = json.dumps(body).encode(), "200 OK"
    except ValueError:
        payload, status = b'{"error": "bad request"}', "400 Bad Request"
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    writer.close()


async def main(argv: list[str]) -> None:
    engine = make_engine(argv)
    server = await asyncio.start_server(lambda r, w: handle(r, w, engine), "127.0.0.1",
                                        0 if "--self-test" in argv else 8765)
    port = server.sockets[0].getsockname()[1]
    if "--self-test" not in argv:
        print(f"serving on http://127.0.0.1:{port}/ask?q=...")
        async with server:
            await server.serve_forever()
        return
    import httpx

    async with server, httpx.AsyncClient(timeout=120) as client:
        questions = ["2+2?", "sqrt(81)?", "3*7?"]
        replies = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/ask", params={"q": q})
                                         for q in questions))
        for q, r in zip(questions, replies):
            print(q, r.status_code, r.json())
        print("served", sum(r.status_code == 200 for r in replies), "requests on one engine")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
