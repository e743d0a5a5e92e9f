"""The tools shipped in tools/: the demo set and http_get (against a local server)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import anyio
import pytest

from agentloop import RunContext, load_tools

ROOT = Path(__file__).resolve().parents[1]
DEMO = {t.name: t for t in load_tools(str(ROOT / "tools/demo.py"))}


def run(name: str, deps=None, **args):
    t = DEMO[name]
    return anyio.run(lambda: t.run(args, RunContext(deps, tool_name=name)))


def test_weather_is_deterministic_and_checked() -> None:
    a, b = run("get_weather", city="Paris", days=3), run("get_weather", city="Paris", days=3)
    assert a == b or a.content == b.content
    assert a.content.startswith("Paris: day 1:") and a.content.count("day ") == 3
    assert run("get_weather", city="Paris", days=9).is_error


@pytest.mark.parametrize("expr, out", [("2*(3+4)**2/7", "14"), ("sqrt(2)", "1.4142135624"), ("10 % 4", "2"),
                                       ("-3 + pi", "0.1415926536")])
def test_calculator(expr: str, out: str) -> None:
    assert run("calculator", expression=expr).content == out


@pytest.mark.parametrize("expr, why", [("9**9**9", "calculator failed: ValueError"),
                                       ("2 x 3", "calculator failed: ValueError"),  # "x": in the pattern, not Python
                                       ("log(0)", "calculator failed: ValueError"),
                                       # outside the expression's pattern: refused before it runs
                                       ("1 +", "String should match pattern"),
                                       ("__import__('os').system('ls')", "String should match pattern")])
def test_calculator_refuses(expr: str, why: str) -> None:
    r = run("calculator", expression=expr)
    assert r.is_error and why in r.content


def test_the_expression_pattern_is_arithmetic() -> None:
    """The pattern is what a canvas can spell: every expression the demo model was trained
    to write (and the "x" it is trained to correct), none of the malformed ones a canvas
    wrote under a looser pattern (two numbers with no operator, a stray operator, the
    sentence's full stop, a name soup)."""
    import re

    from agentloop.demo_tools import EXPRESSION_PATTERN
    from agentloop.training.data import conversations

    trained = {c.arguments["expression"] for conv in conversations(3000, 0, "train") for st in conv.steps
               for c in st.calls or () if c.name == "calculator"}
    assert len(trained) > 300 and "x" in "".join(trained)
    written = ["2*(3+4)**2/7", "sqrt(2) * (3 + 4)", "round(2.5, 1)", "-3 + pi", "1.00584e+06 + 8", "10 // 3 % 2",
               "((1 + 2) * (3 - 4)) / 5"]
    for e in sorted(trained) + written:
        assert re.fullmatch(EXPRESSION_PATTERN, e), e
    for e in ["87.0 309.6", "181.7 * *..", "835 * 40.", "370.7 - -..", "pi *sin", "pisin.", "1 +", "()", "sqrt"]:
        assert not re.fullmatch(EXPRESSION_PATTERN, e), e
    assert re.fullmatch(EXPRESSION_PATTERN, "(((1 + 2)") and len(EXPRESSION_PATTERN) < 400  # balance: the evaluator's


def test_convert_units() -> None:
    assert run("convert_units", value=12, from_unit="mi", to_unit="km").content == "12 mi = 19.3121 km"
    assert run("convert_units", value=100, from_unit="C", to_unit="F").content == "100 C = 212 F"
    assert run("convert_units", value=1, from_unit="kg", to_unit="lb").content == "1 kg = 2.2046 lb"
    assert "cannot convert length (km) to mass (kg)" in run("convert_units", value=1, from_unit="km",
                                                           to_unit="kg").content
    assert run("convert_units", value=1, from_unit="km", to_unit="parsec").is_error  # not in the enum


def test_time() -> None:
    assert "(Asia/Tokyo)" in run("get_time", city="Tokyo").content
    assert "unknown city" in run("get_time", city="Atlantis").content


def test_notes_and_files_stay_in_the_sandbox(tmp_path) -> None:
    box = tmp_path / "box"
    assert run("list_notes", deps=box).content == "no notes"
    run("add_note", deps=box, title="milk", text="buy 2 l")
    assert run("list_notes", deps=box).content == "1. milk: buy 2 l"
    assert run("write_file", deps=box, path="a/todo.txt", content="x").content == "wrote 1 characters to a/todo.txt"
    assert run("read_file", deps=box, path="a/todo.txt").content == "x"
    assert run("list_files", deps=box).content.splitlines() == ["a/todo.txt", "notes.json"]
    for bad in ("../escape.txt", "/etc/passwd", "a/../../x"):
        r = run("write_file", deps=box, path=bad, content="no")
        assert r.is_error and "outside the sandbox" in r.content
    assert not (tmp_path / "escape.txt").exists()
    assert "no file" in run("read_file", deps=box, path="nope.txt").content


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/big":
            body = b"x" * 50_000
            ctype = "text/plain"
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/small")
            self.end_headers()
            return
        elif self.path == "/png":
            body, ctype = b"\x89PNG....", "image/png"
        else:
            body, ctype = "héllo".encode(), "text/plain; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_get(server: str) -> None:
    (http_get,) = load_tools(str(ROOT / "tools/web.py"))

    def get(**args):
        return anyio.run(lambda: http_get.run(args))

    r = get(url=server + "/small")
    assert r.content == "HTTP 200 OK; text/plain; charset=utf-8; 6 bytes\nhéllo"
    r = get(url=server + "/big", max_bytes=1000)
    assert r.content.startswith("HTTP 200 OK; text/plain; 1000 bytes (truncated)\n") and r.content.endswith("x" * 10)
    assert get(url=server + "/redirect").content.endswith("héllo")
    assert get(url=server + "/png").content.endswith("(binary body not shown)")
    assert "only http and https" in get(url="file:///etc/passwd").content
    assert get(url=server + "/small", max_bytes=0).is_error  # validated: ge=1
    r = get(url="http://127.0.0.1:9/", timeout_s=2)
    assert r.is_error and "ConnectError" in r.content


def test_parallel_notes_are_not_lost(tmp_path) -> None:
    box = tmp_path / "box"
    t = DEMO["add_note"]

    async def main() -> list:
        out = []

        async def one(i: int) -> None:
            out.append(await t.run({"title": f"n{i}", "text": "x"}, RunContext(box, tool_name="add_note")))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        return out

    results = anyio.run(main)
    assert not any(r.is_error for r in results)
    assert len(run("list_notes", deps=box).content.splitlines()) == 20


def test_calculator_refuses_huge_results_fast() -> None:
    import time

    t0 = time.perf_counter()
    r = run("calculator", expression="(((9**99)**99)**99)**20")
    assert r.is_error and "too large" in r.content and time.perf_counter() - t0 < 1
