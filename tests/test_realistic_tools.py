"""A fixed corpus of realistic tool schemas (agentloop/data/tool_schemas.json): every call the
DP emits under random logits parses into a call whose arguments validate with jsonschema
against that tool's parameters, in both wire formats."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from agentloop.grammar import compile_tools
from conftest import calls_under_random_logits

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop/data/tool_schemas.json").read_text())
BY_NAME = {t["name"]: t for t in TOOLS}


def validate(call) -> None:
    schema = BY_NAME[call.name]["parameters"]
    v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [e.message for e in v.iter_errors(call.arguments)]
    assert not errors, (call, errors)


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
@pytest.mark.parametrize("chunk", range(0, len(TOOLS), 5))
def test_every_emitted_call_validates(btok, wire_format, chunk):
    tools = TOOLS[chunk : chunk + 5]
    g = compile_tools(tools, btok, wire_format, allow_text=False)
    gen = torch.Generator().manual_seed(chunk)
    seen = set()
    # A low temperature on random logits still produces long, odd strings: the point is
    # that whatever the model prefers, the emitted call is valid.
    for call in calls_under_random_logits(g, gen, [4.0] * 6, 200):
        validate(call)
        seen.add(call.name)
    assert seen, "no call was emitted"


def test_canonical_examples_are_accepted(btok):
    g = compile_tools(TOOLS[:5], btok, "gemma4")
    assert g.accepts_json([{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3, "units": "metric"}}])
    assert not g.accepts_json([{"name": "get_weather", "arguments": {"city": "", "days": 3}}])  # minLength 1
    assert not g.accepts_json([{"name": "get_weather", "arguments": {"city": "Paris", "extra": 1}}])


def test_device_passes_match_the_host_passes(btok, monkeypatch):
    """Logits on a GPU keep the vocabulary passes in torch (``device_passes``); run here on
    the CPU, they must give what the compiled host passes give: the same Viterbi canvas
    and, from the same random numbers, the same sample; the same marginals and entropies."""
    import torch

    from agentloop.grammar import compile_tools
    from agentloop.grammar.compiled import CompiledGrammar

    g = compile_tools(TOOLS[:4], btok, "gemma4")
    for seed in range(3):
        logits = torch.randn(2, 48, g.vocab.size + 5, generator=torch.Generator().manual_seed(seed)) * 4
        host = g.denoise_step(logits, generator=torch.Generator().manual_seed(seed), partial=True)
        monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", True)
        dev = g.denoise_step(logits, generator=torch.Generator().manual_seed(seed), partial=True)
        monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", False)
        assert dev.argmax == host.argmax and dev.sample == host.sample
        assert torch.allclose(dev.log_marginals, host.log_marginals, atol=1e-4)
        assert torch.allclose(dev.entropy, host.entropy, atol=1e-5)
        assert torch.isneginf(dev.log_marginals[..., g.vocab.size:]).all()  # padding columns never allowed
