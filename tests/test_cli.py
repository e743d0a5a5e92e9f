from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from agentloop.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_grammar_check_reports_sizes(tmp_path):
    tools = json.loads((ROOT / "tests/data/tool_schemas.json").read_text())[:3]
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    r = CliRunner().invoke(main, ["grammar", "check", str(f), "--wire-format", "json"])
    assert r.exit_code == 0, r.output
    assert "3 tools, wire format json" in r.output and "states" in r.output


def test_grammar_check_errors_name_the_keyword(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$dynamicRef": "#x"}}}}]))
    r = CliRunner().invoke(main, ["grammar", "check", str(f)])
    assert r.exit_code == 1
    assert "'$dynamicRef' is not supported" in r.output and "/properties/a/$dynamicRef" in r.output
    r = CliRunner().invoke(main, ["grammar", "check", str(tmp_path / "missing.json")])
    assert r.exit_code == 2


def test_demo_runs_offline_as_a_real_subprocess():
    r = subprocess.run([sys.executable, "-m", "agentloop.cli", "demo", "--steps", "2", "--canvas", "48"],
                       capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "parsed: ParsedOutput(calls=[ToolCall(name=" in r.stdout


def test_example_script_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples/constrain_a_canvas.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "get_weather" in r.stdout
