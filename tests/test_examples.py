"""Every runnable example in examples/ runs to completion (as a user would run it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "asyncio_app.py": (["--self-test"], "served 3 requests on one engine"),
    "custom_tools.py": ([], "answer: Your order 1"),
    "trio_agent.py": ([], "live canvas drafts under trio"),
    "sync_script.py": ([], "usage: Usage("),
    "engine_session.py": ([], "prefilled this turn:"),
    "constrain_a_canvas.py": ([], ""),
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name: str) -> None:
    args, marker = CASES[name]
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker in r.stdout


def test_the_readmes_grammar_snippet_runs() -> None:
    """The README's grammar API block is runnable as it stands (tokenizer and logits made in it)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## The grammar API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
