from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from agentloop.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_grammar_check_reports_sizes(tmp_path):
    tools = json.loads((ROOT / "agentloop/data/tool_schemas.json").read_text())[:3]
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    r = CliRunner().invoke(main, ["grammar", "check", str(f), "--wire-format", "json"])
    assert r.exit_code == 0, r.output
    assert "3 tools, wire format json" in r.output and "states" in r.output


def test_grammar_check_and_tools_print_where_the_grammar_narrows_a_schema(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"name": "note", "parameters": {"type": "object", "properties": {
        "body": {"type": "string", "maxLength": 5000}, "tags": {"type": "array", "items": {"type": "string"}}}}}]))
    r = CliRunner().invoke(main, ["grammar", "check", str(f)])
    assert r.exit_code == 0, r.output
    assert "note: narrowed at /properties/body/maxLength: strings longer than 512 characters" in r.output
    assert r.output.count("narrowed at") == 1
    py = tmp_path / "note_tools.py"
    py.write_text('from typing import Any\nfrom agentloop import tool\n@tool\n'
                  'def save(meta: dict[str, Any]) -> str:\n    """Save."""\n    return "ok"\n')
    r = CliRunner().invoke(main, ["tools", str(py)])
    assert r.exit_code == 0, r.output
    assert "narrowed at /properties/meta/additionalProperties: only empty arrays and objects from 2 levels" in r.output


def test_grammar_check_errors_name_the_keyword(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$dynamicRef": "#x"}}}}]))
    r = CliRunner().invoke(main, ["grammar", "check", str(f)])
    assert r.exit_code == 1
    assert "'$dynamicRef' is not supported" in r.output and "/properties/a/$dynamicRef" in r.output
    r = CliRunner().invoke(main, ["grammar", "check", str(tmp_path / "missing.json")])
    assert r.exit_code == 2


def test_random_demo_runs_offline_as_a_real_subprocess():
    r = subprocess.run([sys.executable, "-m", "agentloop.cli", "demo", "--random", "--steps", "2", "--canvas", "48"],
                       capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "parsed: ParsedOutput(calls=[ToolCall(name=" in r.stdout


def test_example_script_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples/constrain_a_canvas.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "get_weather" in r.stdout


RUN = ["--model", "random", "--max-denoising-steps", "3", "--seed", "0"]


def test_run_json_and_trace():
    r = CliRunner().invoke(main, ["run", "What is 12 mi in km?", "--tools", "tools/demo.py:convert_units", *RUN,
                                  "--max-steps", "2", "--json"])
    # a random model either answers (exit 0) or keeps calling until max_steps (exit 1); both print JSON
    assert r.exit_code in (0, 1), r.output
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(data) >= {"output", "calls", "usage", "trace"}
    assert data["trace"] and {"prefill_tokens", "decoder_s", "constraint_s", "tool_s"} <= set(data["trace"][0])
    for c in data["calls"]:
        assert c["name"] == "convert_units" and not c["is_error"] or "cannot convert" in c["result"]


def test_run_usage_errors_exit_2(tmp_path, monkeypatch):
    import agentloop.builtin

    monkeypatch.setattr(agentloop.builtin, "BUILTIN_MODEL_DIR", tmp_path)  # an installation without the model
    r = CliRunner().invoke(main, ["run", "hi", "--model", "builtin"])
    assert r.exit_code == 2 and "--model random" in r.output
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["run", "hi", "--model", "/no/such/folder"])
    assert r.exit_code == 2 and "is not a folder" in r.output
    r = CliRunner().invoke(main, ["run", "hi", "--max-steps", "0", *RUN])
    assert r.exit_code == 2


def test_run_error_exit_1(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from agentloop import tool\n@tool\ndef f(x): pass\n")
    r = CliRunner().invoke(main, ["run", "hi", "--tools", str(bad), *RUN])
    assert r.exit_code == 1 and "parameter 'x' has no type hint" in r.output


def test_tools_lists_schemas():
    r = CliRunner().invoke(main, ["tools", "tools/demo.py", "tools/web.py", "--json"])
    assert r.exit_code == 0, r.output
    names = [t["name"] for t in json.loads(r.output)]
    assert names[:3] == ["get_weather", "calculator", "convert_units"] and names[-1] == "http_get"
    r = CliRunner().invoke(main, ["tools", "tools/demo.py:nope"])
    assert r.exit_code == 1 and "has no 'nope'" in r.output
    r = CliRunner().invoke(main, ["tools"])
    assert r.exit_code == 2


def test_chat_runs_turns_and_keeps_going():
    # No tools: the grammar allows answers only, so every turn ends in one step. (That the
    # session is reused between turns is tested on Agent: test_history_continues_and_reuses_the_session.)
    r = CliRunner().invoke(main, ["chat", *RUN, "--max-steps", "1"],
                           input="hello\nagain\n/trace\n/reset\n/exit\n")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("step  prefill"))
    assert lines[header + 1].split()[0] == "1" and "(answer)" in lines[header + 1]
    assert "(new conversation)" in r.output


def test_help_everywhere():
    for cmd in (["--help"], ["run", "--help"], ["chat", "--help"], ["tools", "--help"], ["demo", "--help"]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 0 and "Usage" in r.output
    assert "agentloop run" in CliRunner().invoke(main, ["run", "--help"]).output


def test_run_as_a_real_subprocess():
    r = subprocess.run([sys.executable, "-m", "agentloop.cli", "run", "2+2?", "--tools", "tools/demo.py:calculator",
                        *RUN, "--max-steps", "1", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    assert "loading model random" in r.stderr
    json.loads(r.stdout.strip().splitlines()[-1])


def test_compile_time_is_told_apart_from_the_loop():
    """A first run's slow request is numba compiling kernels: the CLI counts those seconds
    (real compiles only, not calls of a compiled kernel) and says so beside the time."""
    import numba

    from agentloop.cli import _compile_seconds, _compiling_note

    before = _compile_seconds()

    @numba.njit(cache=False)
    def fresh(x):  # a new function: numba compiles it at its first call
        return x * 3 + 1

    assert fresh(2) == 7
    compiled = _compile_seconds()
    assert compiled > before
    assert fresh(5) == 16  # compiled already: no time added
    assert _compile_seconds() == compiled
    assert _compiling_note(0.2) == ""
    assert _compiling_note(36.24) == "36.2 s of it compiling kernels: first run only, cached after"
