"""DiffusionEngine on tiny random DiffusionGemma configs (milliseconds per step on a CPU)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import anyio
import jsonschema
import numpy as np
import pytest
import torch

from agentloop.engine import DiffusionEngine, GenerationOptions
from agentloop.engine.sampling import entropy_bound_accept, fused_draw
from agentloop.errors import ContextLengthError, EngineInputError, GrammarMismatchError
from agentloop.grammar import CompiledGrammar, compile_schema, compile_tools

from conftest import word_tokenizer

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop" / "data" / "tool_schemas.json").read_text("utf-8"))
PROMPT = "<|turn>user\nWhat is the weather in Paris, and convert 3 miles to km?<turn|>\n<|turn>model\n"


def confident(engine: DiffusionEngine, scale: float = 50.0) -> DiffusionEngine:
    """Make a random model peaked (low entropy), so adaptive stopping and stop tokens happen."""
    with torch.no_grad():
        engine.model.model.decoder.norm.weight.mul_(scale)
    engine.model.final_logit_softcapping = 1e6  # no saturation at +-30, which would create ties
    return engine


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.random(canvas_length=32)


@pytest.fixture(scope="module")
def engine64() -> DiffusionEngine:
    return DiffusionEngine.random(canvas_length=64, seed=1)


# ---- reproduction of transformers' generate() ---------------------------------------------


@pytest.mark.parametrize("peaked", [False, True], ids=["flat", "peaked"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_sampler_reproduces_generate(peaked: bool, seed: int) -> None:
    e = DiffusionEngine.random(canvas_length=32, seed=3)
    if peaked:
        confident(e)
    prompt = e.encode(PROMPT)
    eos = e.model.config.text_config.eos_token_id
    torch.manual_seed(seed)
    ref = e.model.generate(torch.tensor([prompt]), max_new_tokens=96)
    ref_new = ref.sequences[0, len(prompt):].tolist()

    out = e.generate_sync(e.session(prompt), options=GenerationOptions(
        seed=seed, sampler="reference", max_new_tokens=96, stop_ids=[eos]))
    mine = out.tokens + ([out.stop_token] if out.finished else [])
    assert mine == ref_new[: len(mine)]
    if out.finished:  # the library pads everything after eos
        assert set(ref_new[len(mine):]) <= {e.model.config.text_config.pad_token_id}
    else:
        assert len(mine) == len(ref_new) == 96
    assert out.cost.tokens_per_forward == pytest.approx(float(ref.tokens_per_forward[0]), rel=1e-6)
    if peaked:
        assert out.cost.denoising_steps < 48 * out.cost.canvases  # adaptive stopping did happen


def test_fused_draw_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    V = 5000  # spans several blocks of the one-pass kernel
    base = torch.randn(V, generator=g) * 2
    base[17] += 6.0
    base[4100] += 5.0
    R = 40000
    logits = base.repeat(R, 1)[None].clone()  # (1, R, V): the same distribution on every row
    sample, argmax, entropy = fused_draw(logits, 0.8, torch.Generator().manual_seed(1))
    tempered = base / 0.8
    assert torch.allclose(logits[0, 0], tempered)  # tempered in place for self-conditioning
    p = torch.softmax(tempered.double(), -1)
    assert (argmax == int(tempered.argmax())).all()
    ref_h = float(-(p * p.log()).sum())
    assert np.allclose(entropy.numpy(), ref_h, atol=1e-5)
    counts = torch.bincount(sample[0], minlength=V).double()
    # chi-square over the tokens with enough expected mass, the rest pooled
    exp = p * R
    big = exp >= 20
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    chi2 = float(((obs - ex) ** 2 / ex).sum())
    dof = int(big.sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_fused_draw_masked_and_far_tokens() -> None:
    """-inf logits (tokens masked out) are never drawn and add nothing to the entropy; a
    token 100 nats below the best (its float32 term flushed) is drawn with probability 0,
    as float64 would give it (e^-100); a row with one finite logit draws it."""
    g = torch.Generator().manual_seed(3)
    V = 2600  # a block and a partial one, sub-blocks cut mid-block
    base = torch.randn(V, generator=g)
    base[::3] = -math.inf
    base[1000] = base[1001] - 100.0
    R = 4000
    logits = base.repeat(R, 1)[None].clone()  # (1, R, V)
    only = torch.full((1, 2, V), -math.inf)
    only[0, :, 2555] = 1.0
    logits = torch.cat([logits, only], 1)  # (1, R + 2, V)
    sample, argmax, entropy = fused_draw(logits, 1.0, torch.Generator().manual_seed(4))
    finite = torch.isfinite(base)
    assert finite[sample[0, :R]].all() and not (sample[0, :R] == 1000).any()
    p = torch.softmax(base.double(), -1)
    ref_h = float(-(p[finite] * p[finite].log()).sum())
    assert np.allclose(entropy[0, :R].numpy(), ref_h, atol=1e-5)
    assert (argmax[0, :R] == int(base.argmax())).all()
    assert sample[0, R:].tolist() == [2555, 2555] and argmax[0, R:].tolist() == [2555, 2555]
    assert entropy[0, R:].tolist() == [0.0, 0.0]


def test_fast_sampler_matches_reference_statistically() -> None:
    e = confident(DiffusionEngine.random(canvas_length=32, seed=5), scale=12.0)
    prompt = e.encode(PROMPT)
    opts = GenerationOptions(max_new_tokens=32, max_denoising_steps=3, fixed_steps=True, stop_ids=[])
    V = e.vocab_size
    hist = {}
    for sampler in ("reference", "fast"):
        c = torch.zeros(V, dtype=torch.float64)
        for seed in range(120):
            out = e.generate_sync(e.session(prompt), options=opts.replace(seed=1000 + seed, sampler=sampler))
            c += torch.bincount(torch.tensor(out.tokens), minlength=V)
        hist[sampler] = c
    a, b = hist["reference"], hist["fast"]
    tot = a + b
    keep = tot >= 20
    # two-sample chi-square on the pooled token histograms of the final canvases
    obs = torch.stack([torch.cat([a[keep], a[~keep].sum()[None]]), torch.cat([b[keep], b[~keep].sum()[None]])])
    exp = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.shape[1] - 1
    assert dof > 10  # the check has power: many distinct tokens
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_entropy_bound_acceptance() -> None:
    h = torch.tensor([[0.5, 0.0, 0.02, 0.05, 0.3]])
    # sorted 0, .02, .05, .3, .5: cumsum - self = 0, 0, .02, .07, .37
    assert entropy_bound_accept(h, 0.1).tolist() == [[False, True, True, True, True]]


# ---- the constraint inside every step ----------------------------------------------------


def _validate_calls(out, tools) -> None:
    by_name = {t["name"]: t for t in tools}
    assert out.parsed.calls, out.text
    for call in out.parsed.calls:
        jsonschema.validate(call.arguments, by_name[call.name]["parameters"])


@pytest.mark.parametrize("names", [["get_weather"], ["get_weather", "convert_units", "calculator"],
                                   ["create_calendar_event", "send_email"]])
def test_constrained_calls_always_valid(engine64: DiffusionEngine, names: list[str]) -> None:
    tools = [t for t in TOOLS if t["name"] in names]
    g = compile_tools(tools, engine64.tokenizer, "gemma4", allow_text=False)
    for seed in range(6):
        s = engine64.session(PROMPT)
        before = len(s)
        out = engine64.generate_sync(s, g, options=GenerationOptions(seed=seed, max_new_tokens=1024,
                                                                     max_denoising_steps=6))
        assert out.finished and out.stop_token == engine64.encode("<|tool_response>")[0]
        assert g.accepts(out.tokens + [out.stop_token])
        _validate_calls(out, tools)
        assert s.tokens[before:] == out.tokens  # the session holds the output, not the stop token
        # every canvas alone is a valid continuation: the concatenation is accepted
        assert g.state_after([t for c in out.canvases for t in c]) >= 0


def test_pruning_is_tried_less_often_while_it_gives_up(engine64: DiffusionEngine, monkeypatch) -> None:
    """A random model's logits are flat: pruning gives up at every step that tries it, and
    the engine then skips trying on the next 1, 2, 4, 8, 8 ... steps (``PruningSchedule``);
    the calls stay valid."""
    steps: list[tuple[bool, bool]] = []  # (tried, pruned) per step
    step = CompiledGrammar.denoise_step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = step(self, *args, **kwargs)
        steps.append((kwargs["prune"], out.pruned))
        return out

    monkeypatch.setattr(CompiledGrammar, "denoise_step", spy)
    tools = TOOLS[:5]
    g = compile_tools(tools, engine64.tokenizer, "gemma4", allow_text=False)
    out = engine64.generate_sync(engine64.session(PROMPT), g, options=GenerationOptions(seed=0, max_new_tokens=64))
    assert g.accepts(out.tokens + [out.stop_token]) if out.finished else g.state_after(out.tokens) >= 0
    assert len(steps) == 48
    tried = [i for i, (t, _) in enumerate(steps) if t]
    assert all(not pruned for _, pruned in steps)  # it gave up each time it tried
    assert tried == [0, 2, 5, 10, 19, 28, 37, 46]  # pauses of 1, 2, 4, then 8 steps


def test_constrained_defaults_and_text_branch(engine: DiffusionEngine) -> None:
    """Default sampler settings (48 steps, adaptive stop) on a tools grammar that allows text."""
    tools = [t for t in TOOLS if t["name"] in ("get_time", "calculator")]
    g = compile_tools(tools, engine.tokenizer, "gemma4")
    for seed in range(3):
        out = engine.generate_sync(engine.session(PROMPT), g, options=GenerationOptions(seed=seed,
                                                                                        max_new_tokens=96))
        assert g.accepts(out.tokens + [out.stop_token])
        assert (out.parsed.text is None) != (not out.parsed.calls)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"city": {"type": "string", "minLength": 40},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 14}},
     "required": ["city", "days"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 9},
    {"type": "number", "minimum": -5, "maximum": 5},
])
def test_constrained_value_spans_canvases(engine: DiffusionEngine, schema: dict) -> None:
    g = compile_schema(schema, engine.tokenizer, "json")
    for seed in range(4):
        out = engine.generate_sync(engine.session(PROMPT), g, options=GenerationOptions(seed=seed,
                                                                                        max_new_tokens=256,
                                                                                        max_denoising_steps=4))
        assert out.finished
        assert g.accepts(out.tokens + [out.stop_token])
        jsonschema.validate(out.parsed, schema)
        if schema.get("type") == "object":
            assert out.cost.canvases >= 2  # 40 characters of city alone outgrow a 32-token canvas


def test_forced_tokens_cost_no_denoising(engine: DiffusionEngine) -> None:
    g = compile_schema({"const": {"ok": True}}, engine.tokenizer, "json")
    out = engine.generate_sync(engine.session(PROMPT), g, options=GenerationOptions(seed=0))
    assert out.parsed == {"ok": True}
    assert out.cost.denoising_steps == 0
    assert out.cost.forced_tokens == out.cost.generated_tokens == len(engine.encode('{"ok":true}')) + 1

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    g = compile_schema(schema, engine.tokenizer, "json")
    prefix = engine.encode('{"city":"')
    drafts = []
    out = engine.generate_sync(engine.session(PROMPT), g, options=GenerationOptions(seed=1, max_denoising_steps=5),
                               on_draft=drafts.append)
    assert out.tokens[: len(prefix)] == prefix
    assert out.cost.forced_tokens >= len(prefix)
    assert drafts and drafts[0].step == 1 and drafts[0].tokens[: len(prefix)] == prefix
    assert [d.step for d in drafts] == list(range(1, out.cost.denoising_steps + 1))
    assert all(len(d.tokens) == engine.canvas_length for d in drafts)


def test_constraint_from_another_tokenizer_is_refused(engine: DiffusionEngine) -> None:
    other = word_tokenizer(["{", "}", '"a"', ":", "1"])
    g = compile_schema({"type": "object"}, other, "json")
    with pytest.raises(GrammarMismatchError, match="compile it with engine.tokenizer"):
        engine.generate_sync(engine.session(PROMPT), g)


# ---- sessions ------------------------------------------------------------------------------


def test_incremental_cache_equals_from_scratch() -> None:
    """Several turns, past the sliding window (64 tokens in the tiny config)."""
    e = DiffusionEngine.random(canvas_length=32, seed=2)
    s = e.session(PROMPT)
    probe = e.encode("<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>") + [0] * 12
    probe = probe[:32]
    opts = GenerationOptions(max_new_tokens=32, max_denoising_steps=3)
    for turn in range(4):
        out = e.generate_sync(s, options=opts.replace(seed=turn))
        s.append_text(f"<|tool_response>response:get_weather{{value:<|\"|>{turn * 7} degrees<|\"|>}}<tool_response|>")
        pending = s.pending_length
        assert pending == len(out.tokens) + len(e.encode(f"<|tool_response>response:get_weather{{value:<|\"|>"
                                                          f"{turn * 7} degrees<|\"|>}}<tool_response|>"))
        inc = e.canvas_logits(s, probe)
        assert s.pending_length == 0 and s.cached_length == len(s)
        fresh = e.canvas_logits(e.session(s.tokens), probe)
        assert float((inc - fresh).abs().max()) < 1e-4
    assert len(s) > 3 * 64


def test_each_call_encodes_only_new_tokens(engine: DiffusionEngine) -> None:
    s = engine.session(PROMPT)
    n0 = len(s)
    out1 = engine.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=32, max_denoising_steps=2))
    assert out1.cost.prefill_tokens == n0
    added = s.append_text("<turn|>\n<|turn>user\nthanks<turn|>\n<|turn>model\n")
    out2 = engine.generate_sync(s, options=GenerationOptions(seed=1, max_new_tokens=32, max_denoising_steps=2))
    assert out2.cost.prefill_tokens == len(out1.tokens) + len(added)


def test_unconstrained_stops_at_first_stop_id() -> None:
    e = confident(DiffusionEngine.random(canvas_length=32, seed=3))
    hits = 0
    for seed in range(8):
        s = e.session(PROMPT)
        out = e.generate_sync(s, options=GenerationOptions(seed=seed, max_new_tokens=64, max_denoising_steps=4))
        if out.finished:
            hits += 1
            assert out.stop_token in e.stop_ids
            assert not set(out.tokens) & set(e.stop_ids)
            assert s.tokens[-len(out.tokens):] == out.tokens if out.tokens else True
        else:
            assert len(out.tokens) == 64 and out.cost.canvases == 2
    assert sorted(e.stop_ids) == sorted(e.encode("<eos><|tool_response><turn|>"))


def test_context_limit_is_a_clear_error() -> None:
    e = DiffusionEngine.random(canvas_length=32, max_position_embeddings=128)
    s = e.session(list(range(3, 3 + 100)))
    with pytest.raises(ContextLengthError, match="new session"):
        e.generate_sync(s)
    s = e.session(list(range(3, 3 + 60)))
    out = e.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=1024, max_denoising_steps=1,
                                                       stop_ids=[]))
    assert out.cost.canvases == 2  # (128 - 60) // 32: what fits, not more


def test_bad_input_errors(engine: DiffusionEngine) -> None:
    with pytest.raises(EngineInputError, match="empty"):
        engine.generate_sync(engine.session())
    with pytest.raises(EngineInputError, match=r"token 1 .* 99999"):
        engine.session([5, 99999])
    with pytest.raises(EngineInputError, match="max_denoising_steps"):
        GenerationOptions(max_denoising_steps=0)
    g = compile_schema({"type": "boolean"}, engine.tokenizer, "json")
    with pytest.raises(EngineInputError, match="reference"):
        engine.generate_sync(engine.session(PROMPT), g, options=GenerationOptions(sampler="reference"))
    other = DiffusionEngine.random(canvas_length=32)
    with pytest.raises(EngineInputError, match="another engine"):
        engine.generate_sync(other.session(PROMPT))


def test_failed_call_leaves_session_as_it_was(engine: DiffusionEngine) -> None:
    s = engine.session(PROMPT)
    engine.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=32, max_denoising_steps=1))
    s.append_text("<|turn>user\nmore<turn|>\n")
    before = s.tokens

    def boom(d):
        if d.canvas_index == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        engine.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=96, max_denoising_steps=2,
                                                          stop_ids=[]), on_draft=boom)
    assert s.tokens == before
    # and the next call works and matches a fresh session's
    probe = list(range(3, 35))
    assert torch.allclose(engine.canvas_logits(s, probe), engine.canvas_logits(engine.session(before), probe),
                          atol=1e-4)


def test_bfloat16_constrained() -> None:
    e = DiffusionEngine.random(canvas_length=32, dtype="bfloat16")
    g = compile_tools([t for t in TOOLS if t["name"] == "get_time"], e.tokenizer, "gemma4", allow_text=False)
    out = e.generate_sync(e.session(PROMPT), g, options=GenerationOptions(seed=0, max_denoising_steps=4,
                                                                          max_new_tokens=256))
    assert g.accepts(out.tokens + [out.stop_token])


# ---- async: shared engine, cancellation ----------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_concurrent_sessions_share_one_engine(engine: DiffusionEngine, backend: str) -> None:
    g = compile_tools([t for t in TOOLS if t["name"] == "get_weather"], engine.tokenizer, "gemma4",
                      allow_text=False)
    opts = GenerationOptions(max_new_tokens=256, max_denoising_steps=3)
    expected = [engine.generate_sync(engine.session(PROMPT), g, options=opts.replace(seed=i)).tokens
                for i in range(4)]
    results: dict[int, list[int]] = {}
    ticks = 0

    async def one(i: int) -> None:
        out = await engine.generate(engine.session(PROMPT), g, options=opts.replace(seed=i))
        results[i] = out.tokens

    async def heartbeat() -> None:  # the event loop stays free while the model runs
        nonlocal ticks
        while len(results) < 4:
            ticks += 1
            await anyio.sleep(0.001)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            for i in range(4):
                tg.start_soon(one, i)

    anyio.run(main, backend=backend)
    assert [results[i] for i in range(4)] == expected
    assert ticks > 4


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancel_stops_the_call(backend: str) -> None:
    e = DiffusionEngine.random(canvas_length=64)
    s = e.session(PROMPT)
    before = s.tokens
    opts = GenerationOptions(seed=0, max_new_tokens=4096, max_denoising_steps=48, stop_ids=[], fixed_steps=True)
    started = threading.Event()

    async def main() -> float:
        with anyio.move_on_after(0.3):
            await e.generate(s, options=opts, on_draft=lambda d: started.set())
        return time.perf_counter()

    t0 = time.perf_counter()
    t1 = anyio.run(main, backend=backend)
    assert started.is_set()
    assert t1 - t0 < 3.0  # a whole call would be 64 canvases x 48 steps
    assert not e._lock.locked()  # the worker thread has left the model
    assert s.tokens == before


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """compile=True (torch.compile of the decoder forward) gives the same canvases; ~45 s of compiling on a CPU."""
    opts = GenerationOptions(seed=0, max_denoising_steps=3, max_new_tokens=32)
    outs = []
    for compiled in (True, False):
        e = DiffusionEngine.random(canvas_length=32, compile=compiled)
        s = e.session(PROMPT)
        first = e.generate_sync(s, options=opts).tokens
        s.append_text("<turn|>\n<|turn>user\nmore please<turn|>\n<|turn>model\n")
        outs.append((first, e.generate_sync(s, options=opts).tokens))
    assert outs[0] == outs[1]


def test_encoder_failure_leaves_the_session_usable(engine: DiffusionEngine, monkeypatch) -> None:
    """A failure half-way through the encoder layers must not leave a half-written cache."""
    s = engine.session(PROMPT)
    engine.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=32, max_denoising_steps=1))
    s.append_text("<|turn>user\nmore<turn|>\n")
    before = s.tokens
    layer = engine.model.model.encoder.language_model.layers[1]
    real = layer.forward

    def boom(*a, **k):
        raise MemoryError("out of memory")

    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(MemoryError):
        engine.generate_sync(s, options=GenerationOptions(seed=0, max_new_tokens=32, max_denoising_steps=1))
    monkeypatch.setattr(layer, "forward", real)
    assert s.tokens == before
    probe = list(range(3, 35))
    assert torch.allclose(engine.canvas_logits(s, probe), engine.canvas_logits(engine.session(before), probe),
                          atol=1e-4)


def test_engine_runs_the_same_with_the_vocabulary_passes_on_the_device(engine64: DiffusionEngine,
                                                                        monkeypatch) -> None:
    """On a GPU the grammar keeps the vocabulary passes in torch on the device (marginals
    fed back as self-conditioning stay there). Forced onto the CPU here: the same seed gives
    the same canvases as the compiled host passes."""
    from agentloop.grammar.compiled import CompiledGrammar

    tools = [t for t in TOOLS if t["name"] in ("get_weather", "convert_units")]
    g = compile_tools(tools, engine64.tokenizer, "gemma4")
    opts = GenerationOptions(seed=3, max_new_tokens=128, max_denoising_steps=8)
    host = engine64.generate_sync(engine64.session(PROMPT), g, options=opts)
    monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", True)
    device = engine64.generate_sync(engine64.session(PROMPT), g, options=opts)
    assert device.tokens == host.tokens and device.canvases == host.canvases
    assert g.accepts(device.tokens + [device.stop_token])


def test_real_width_build_allocates_each_tied_weight_once() -> None:
    """The in-place build of real-width configs (``models.build_tied``), here at tiny width
    on the CPU: the encoder and decoder share their weights, nothing is left on the meta
    device, the buffers (rotary frequencies, embedding scale) equal a plain build's, the
    weights follow the model's own initialisation, and the patched constructor hook is
    restored."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from agentloop.engine.models import build_tied, diffusion_gemma_config

    cfg = diffusion_gemma_config(300, preset="tiny")
    plain = DiffusionGemmaForBlockDiffusion(cfg)
    register = torch.nn.Module.register_parameter
    torch.manual_seed(0)
    model = build_tied(DiffusionGemmaForBlockDiffusion, cfg, torch.device("cpu"))
    assert torch.nn.Module.register_parameter is register
    params = dict(model.named_parameters())
    assert params.keys() == dict(plain.named_parameters()).keys()  # tied names listed once, as in a plain build
    assert not any(p.is_meta for p in params.values())
    assert len({p.data_ptr() for p in params.values()}) == len(params)  # one storage per distinct weight
    enc, dec = model.model.encoder.language_model, model.model.decoder
    assert enc.layers[0].self_attn.q_proj.weight is dec.layers[0].self_attn.q_proj.weight
    plain_buffers = dict(plain.named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, plain_buffers[name]), name
    for name, p in plain.named_parameters():
        assert params[name].std().item() == pytest.approx(p.std().item(), rel=0.3, abs=1e-3), name
    engine = DiffusionEngine(model.eval(), word_tokenizer([f"w{i}" for i in range(298)]))
    out = engine.generate_sync(engine.session([5, 6, 7]), options=GenerationOptions(max_new_tokens=16, max_denoising_steps=2, seed=0))
    assert len(out.tokens) > 0
