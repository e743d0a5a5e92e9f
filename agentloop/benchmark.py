"""The loop-latency benchmark behind ``agentloop bench``: one agent-loop turn (new tokens
encoded + canvases denoised + tools run + results fed back), agentloop against what a
user would do instead, on the same weights and the same conversations.

Contenders, run interleaved (A B C D A B C D ...) on every scenario:

* ``agentloop``: constrained canvases, forced tokens, session cache;
* ``unconstrained``: the same diffusion model without the grammar; its text is parsed and
  checked against the schemas, and a malformed call is retried (at most ``retries``
  times), as prompt-and-parse runtimes do;
* ``autoregressive``: a causal LM of similar size (transformers' Llama with random
  weights) decoding token by token under the same grammar (a per-state token mask), with
  a prefix cache, writing exactly as many tokens as the scripted output ("forced
  lengths": random weights cannot be trusted to stop);
* ``no-cache``: agentloop with the session cache off (the history re-encoded each turn).

Conversations are scripted ("teacher-forced"): every contender sees the same history, and
after each turn the scripted output and tool results (not the contender's own output)
continue it, so all contenders pay for the same tokens. Tools return canned results (a real
tool's time adds the same to every contender). Diffusion contenders denoise as
many canvases as the scripted output needs; with ``steps`` set every canvas takes exactly
that many steps (random weights never become confident), else adaptive stopping decides.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import jsonschema
import torch

from .engine import DiffusionEngine, GenerationOptions, Session
from .errors import ParseError
from .grammar import CompiledGrammar, SchemaOptions, ToolCall, compile_tools
from .grammar.vocabulary import encode_segments
from .protocol import Protocol

CONTENDERS = ("agentloop", "unconstrained", "autoregressive", "no-cache")
PARTS = ("encode", "denoise", "constraint", "sampler", "tool", "overhead")


def bench_tools() -> list[dict[str, Any]]:
    """The 20 realistic tool schemas the benchmark (and the tests) use."""
    return json.loads(resources.files("agentloop").joinpath("data/tool_schemas.json").read_text("utf-8"))


# ---- scenarios -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One model call: an optional new user message, the scripted output, the tools' results."""

    output: tuple[ToolCall, ...] | str
    results: tuple[str, ...] = ()
    user: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    tools: tuple[str, ...]  #: names from bench_tools()
    turns: tuple[Turn, ...]


def _weather(city: str) -> ToolCall:
    return ToolCall("get_weather", {"city": city, "days": 2})


def scenarios(quick: bool = False) -> list[Scenario]:
    names = [t["name"] for t in bench_tools()]
    five, one = tuple(names[:5]), ("get_weather",)
    chain = (
        Turn((ToolCall("convert_units", {"value": 12, "from_unit": "mi", "to_unit": "km"}),), ("19.31 km",),
             user="Convert 12 miles to km, add 3.5 km, note the total and tell me the time in Oslo."),
        Turn((ToolCall("calculator", {"expression": "19.31 + 3.5"}),), ("22.81",)),
        Turn((ToolCall("create_note", {"title": "distance", "body": "22.81 km in total"}),), ("saved note 1",)),
        Turn((ToolCall("get_time", {"timezone": "Europe/Oslo"}),), ("2026-11-27 14:05",)),
        Turn("You walk 22.81 km in total (noted); it is 14:05 in Oslo."),
    )
    single = (Turn((_weather("Paris"),), ("Paris: sunny, 18 C; tomorrow rain, 14 C",),
                   user="What's the weather in Paris for the next two days?"),)
    out = [
        Scenario("single call / 1 tool", one, single),
        Scenario("single call / 5 tools", five, single),
        Scenario("single call / 20 tools", tuple(names), single),
        Scenario("5-turn chain / 5 tools", five, chain),
        Scenario("3 parallel calls / 5 tools", five, (
            Turn(tuple(_weather(c) for c in ("Oslo", "Lima", "Seoul")), ("Oslo: 2 C", "Lima: 19 C", "Seoul: 8 C"),
                 user="Weather in Oslo, Lima and Seoul?"),)),
        Scenario("answer only / 5 tools", five, (Turn("Hello! I can check weather, convert units, compute, "
                                                      "tell the time and take notes.", user="Hi, what can you do?"),)),
    ]
    long_turns = []
    for i in range(6 if quick else 30):
        city = ["Oslo", "Lima", "Seoul", "Paris", "Quito", "Perth"][i % 6]
        long_turns += [Turn((_weather(city),), (f"{city}: {10 + i} C",), user=f"And the weather in {city}?"),
                       Turn(f"It is {10 + i} C in {city}.")]
    out.append(Scenario(f"long session ({len(long_turns) // 2} turns) / 5 tools", five, tuple(long_turns)))
    if quick:
        out = [s for s in out if not s.name.startswith("single call / 20")]
    return out


def demo_tool_schemas() -> list[dict[str, Any]]:
    """The demo tools (what the bundled model knows), as the benchmark's tool dicts."""
    from . import demo_tools

    return [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in demo_tools.TOOLS]


def demo_scenarios(quick: bool = False) -> list[Scenario]:
    """The same shapes over the demo tools, with their real results: what the bundled model
    was trained on (1, 5 and all 9 tools instead of 1, 5 and 20)."""
    from . import demo_tools as demo

    names = tuple(t.name for t in demo.TOOLS)
    five = ("get_weather", "calculator", "convert_units", "get_time", "add_note")

    def weather(city: str) -> tuple[ToolCall, str]:
        return ToolCall("get_weather", {"city": city}), str(demo.get_weather(city))

    def day1(result: str) -> str:
        return result.split("; ")[0].split(": ", 2)[2]

    call, res = weather("Oslo")
    single = (Turn((call,), (res,), user="What's the weather in Oslo?"), Turn(f"In Oslo: {day1(res)}."))
    conv = str(demo.convert_units(12, "mi", "km"))
    km = conv.split(" = ")[1].split(" ")[0]
    total = str(demo.calculator(f"{km} + 5"))
    chain = (
        Turn((ToolCall("convert_units", {"value": 12, "from_unit": "mi", "to_unit": "km"}),), (conv,),
             user="Convert 12 miles to km and add 5."),
        Turn((ToolCall("calculator", {"expression": f"{km} + 5"}),), (total,)),
        Turn(f"12 mi is {km} km; plus 5 that makes {total}."),
    )
    three = [weather(c) for c in ("Oslo", "Lima", "Seoul")]
    out = [
        Scenario("single call / 1 tool", ("get_weather",), single),
        Scenario("single call / 5 tools", five, single),
        Scenario(f"single call / {len(names)} tools", names, single),
        Scenario("3-turn chain / 5 tools", five, chain),
        Scenario("3 parallel calls / 5 tools", five, (
            Turn(tuple(c for c, _ in three), tuple(r for _, r in three), user="Weather in Oslo, Lima and Seoul?"),
            Turn("; ".join(f"{r.split(':')[0]} has {day1(r)}" for _, r in three) + "."))),
        Scenario("answer only / 5 tools", five, (Turn("Hello! How can I help?", user="Hi!"),)),
    ]
    long_turns = []
    for i in range(6 if quick else 30):
        call, res = weather(["Oslo", "Lima", "Seoul", "Paris", "Quito", "Perth"][i % 6] + ("" if i < 6 else f" {i}"))
        city = call.arguments["city"]
        long_turns += [Turn((call,), (res,), user=f"What's the weather in {city}?"), Turn(f"In {city}: {day1(res)}.")]
    out.append(Scenario(f"long session ({len(long_turns) // 2} turns) / 5 tools", five, tuple(long_turns)))
    return out


# ---- measurement ---------------------------------------------------------------------------------


@dataclass
class TurnRecord:
    scenario: str
    contender: str
    repeat: int
    turn: int
    wall_s: float
    parts: dict[str, float]
    steps: int  #: denoising steps (diffusion) or token forwards (autoregressive)
    forced_tokens: int
    output_tokens: int
    prefill_tokens: int
    valid: bool | None  #: None where it does not apply (the forced-length autoregressive contender)
    retries: int = 0
    useful_tokens: int = 0  #: the scripted output's tokens (+ stop): what the turn had to produce


@dataclass
class Conversation:
    """The teacher-forced history of one scenario, as (text, literal) segments per turn."""

    protocol: Protocol
    tools: list[dict[str, Any]]
    instructions: str = "You are a helpful assistant. Use the tools when they help."
    declare_tools: bool = True
    #: the user messages and tool results so far: what copied parameters may take
    sources: list[str] = field(default_factory=list)

    def system(self) -> list[tuple[str, bool]]:
        p = self.protocol
        decls = [p.render_declaration(t["name"], t.get("description", ""), t["parameters"]) for t in self.tools] \
            if self.declare_tools else []
        return [(p.system_turn(self.instructions, decls), False)]

    def before(self, turn: Turn, first_model_step: bool) -> list[tuple[str, bool]]:
        p = self.protocol
        out: list[tuple[str, bool]] = []
        if turn.user is not None:
            self.sources.append(turn.user)
            out += p.user_segments(turn.user)
        if first_model_step:
            out.append((p.model_start, False))
        return out

    def output(self, turn: Turn) -> list[tuple[str, bool]]:
        p = self.protocol
        if isinstance(turn.output, str):
            return p.text_segments(turn.output)
        return p.calls_segments(list(turn.output), {t["name"]: t["parameters"] for t in self.tools})

    def output_ids(self, engine: DiffusionEngine, turn: Turn) -> list[int]:
        return encode_segments(engine.tokenizer, self.output(turn))

    def after(self, turn: Turn) -> list[tuple[str, bool]]:
        p = self.protocol
        if isinstance(turn.output, str):
            return [(p.model_end, False)]
        self.sources += turn.results
        return p.after_calls_segments([(c.name, r) for c, r in zip(turn.output, turn.results)])


def _valid(parsed: Any, turn: Turn, schemas: dict[str, Any]) -> bool:
    """The same test for every contender: the turn's kind of output (calls where calls are
    due, an answer where an answer is), with every call valid for its schema."""
    if isinstance(turn.output, str):
        return parsed.text is not None and not parsed.calls
    if parsed.text is not None or not parsed.calls:
        return False
    try:
        for c in parsed.calls:
            jsonschema.validate(c.arguments, schemas[c.name])
    except (KeyError, jsonschema.ValidationError):
        return False
    return True


def turn_grammar(base: CompiledGrammar, engine: DiffusionEngine, conv: Conversation) -> tuple[CompiledGrammar, float]:
    """The grammar a turn runs under and what it cost to get: the tool set's own, or, with
    copied parameters, one compiled from the conversation's texts as ``Agent`` does each
    step. The in-memory caches are cleared first: in real use every turn brings new text,
    while here repeats would find their grammars cached."""
    from . import grammar
    from .grammar.copy import uses_copy

    if not any(uses_copy(t["parameters"]) for t in conv.tools):
        return base, 0.0
    t = time.perf_counter()
    grammar.clear_caches()
    g = compile_tools(conv.tools, engine.tokenizer, "gemma4", options=SchemaOptions(copy_sources=tuple(conv.sources)))
    return g, time.perf_counter() - t


class _Diffusion:
    """agentloop, unconstrained and no-cache: the same engine, three ways."""

    def __init__(self, kind: str, engine: DiffusionEngine, grammar: CompiledGrammar, conv: Conversation,
                 options: GenerationOptions, retries: int) -> None:
        self.kind, self.engine, self.g, self.conv, self.options, self.retries = (kind, engine, grammar, conv, options,
                                                                                 retries)
        self.session: Session = engine.session()
        self.append(conv.system())

    def append(self, segments: Sequence[tuple[str, bool]]) -> None:
        self.session.append_segments(segments)

    def turn(self, turn: Turn, before: list[tuple[str, bool]], seed: int) -> tuple[dict[str, float], int, int, int,
                                                                                  int, bool, int]:
        self.append(before)
        target = self.conv.output_ids(self.engine, turn)
        L = self.engine.canvas_length
        opts = self.options.replace(max_new_tokens=L * math.ceil((len(target) + 1) / L), seed=seed)
        parts = dict.fromkeys(PARTS, 0.0)
        grammar = self.g
        if self.kind != "unconstrained":
            grammar, parts["constraint"] = turn_grammar(self.g, self.engine, self.conv)
        steps = forced = out_tokens = prefill = tries = 0
        valid = False
        base = len(self.session)
        while True:
            if self.kind == "no-cache":
                self.session.reset_cache()
            constraint = None if self.kind == "unconstrained" else grammar
            out = self.engine.generate_sync(self.session, constraint, options=opts)
            c = out.cost
            parts["encode"] += c.encoder_s
            parts["denoise"] += c.decoder_s
            parts["constraint"] += c.constraint_s
            parts["sampler"] += c.sampler_s
            steps += c.denoising_steps
            forced += c.forced_tokens
            out_tokens += c.generated_tokens
            prefill += c.prefill_tokens
            if self.session.cached_length > base:  # a canvas of the output was encoded: start the cache over
                self.session.reset_cache()
            self.session.truncate(base)  # the scripted output continues the conversation, not this one
            schemas = {x["name"]: x["parameters"] for x in self.conv.tools}
            if constraint is not None:
                valid = out.finished and _valid(out.parsed, turn, schemas)
                break
            t = time.perf_counter()
            try:
                valid = out.finished and _valid(self.conv.protocol.parse_output(out.text), turn, schemas)
            except ParseError:
                valid = False
            parts["constraint"] += time.perf_counter() - t  # parsing and checking is this contender's constraint
            if valid or tries >= self.retries:
                break
            tries += 1
            opts = opts.replace(seed=seed + 1000 * tries)
        self.session.append(target)
        return parts, steps, forced, out_tokens, prefill, valid, tries


class _Autoregressive:
    """A causal LM decoding token by token under the grammar's per-state token mask."""

    def __init__(self, model: Any, engine: DiffusionEngine, grammar: CompiledGrammar, conv: Conversation) -> None:
        from transformers import DynamicCache

        self.model, self.engine, self.g, self.conv = model, engine, grammar, conv
        self.cache = DynamicCache(config=model.config)
        self.tokens: list[int] = []
        self.cached = 0
        self.device = next(model.parameters()).device
        self.append(conv.system())

    def append(self, segments: Sequence[tuple[str, bool]]) -> None:
        self.tokens += encode_segments(self.engine.tokenizer, segments)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(self.cached, self.cached + len(ids), device=self.device)[None]
        out = self.model(input_ids=x, position_ids=pos, cache=self.cache, use_cache=True)
        self.cached += len(ids)
        return out.logits[0, -1]

    def turn(self, turn: Turn, before: list[tuple[str, bool]], seed: int) -> tuple[dict[str, float], int, int, int,
                                                                                  int, bool, int]:
        self.append(before)
        target = self.conv.output_ids(self.engine, turn)
        parts = dict.fromkeys(PARTS, 0.0)
        g, parts["constraint"] = turn_grammar(self.g, self.engine, self.conv)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            t = time.perf_counter()
            new = self.tokens[self.cached:]
            prefill = len(new)
            logits = self._forward(new)
            sync()
            parts["encode"] += time.perf_counter() - t
            q = g.start_state
            n = len(target) + 1  # forced length: the scripted output and its stop token
            for _ in range(n):
                t = time.perf_counter()
                mask = torch.from_numpy(g.allowed_tokens(q)).to(self.device)
                parts["constraint"] += time.perf_counter() - t
                t = time.perf_counter()
                scores = logits[: mask.shape[0]].masked_fill(~mask, -math.inf)
                tok = int(scores.argmax())
                parts["sampler"] += time.perf_counter() - t
                nq = g.automaton.step(q, tok)
                q = nq if nq >= 0 and not g.is_complete(nq) else q
                t = time.perf_counter()
                logits = self._forward([tok])
                sync()
                parts["denoise"] += time.perf_counter() - t
            self.cache.crop(-(self.cached - len(self.tokens)))  # drop what it wrote: the scripted output continues
            self.cached = len(self.tokens)
        self.tokens += target
        # Random weights at a forced length: its output is grammar-valid token by token but
        # not a finished call, so validity does not apply (None).
        return parts, n, 0, n, prefill, None, 0


def _ar_model(engine: DiffusionEngine, seed: int) -> Any:
    """A Llama as wide and deep as the diffusion model, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = engine.model.config.text_config.to_dict()  # head_dim is per layer on the config object
    # Dense, with the width of the MoE's active path (dense MLP + top-k experts): about the
    # same compute per token as the diffusion model.
    cfg = LlamaConfig(vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"],
                      intermediate_size=tc["intermediate_size"] + tc["top_k_experts"] * tc["moe_intermediate_size"],
                      num_hidden_layers=tc["num_hidden_layers"], num_attention_heads=tc["num_attention_heads"],
                      num_key_value_heads=tc["num_key_value_heads"], head_dim=tc["head_dim"],
                      max_position_embeddings=tc["max_position_embeddings"], tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(device=engine.device, dtype=engine.dtype).eval()


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    model: str = "random"  #: builtin, random, a checkpoint folder, or random:diffusiongemma-26b-a4b
    device: str = "cpu"
    dtype: str = "float32"
    steps: int = 16  #: fixed denoising steps per canvas; 0: adaptive stopping
    repeats: int = 3
    retries: int = 2
    quick: bool = False
    canvas_length: int = 256
    only: tuple[str, ...] = ()  #: scenario name prefixes to run
    seed: int = 0
    #: "realistic" (20 realistic schemas), "demo" (the demo tools, real results: what the
    #: bundled model knows), or "auto": demo for a model agentloop trained, else realistic
    domain: str = "auto"


def make_engine(cfg: BenchConfig) -> tuple[DiffusionEngine, str]:
    """The engine and a sentence saying which weights it has."""
    from .engine.models import BUILTIN_MODEL_DIR

    if cfg.model == "random":
        # A long context: 20 tool declarations in a byte-level tokenizer are ~8k tokens.
        e = DiffusionEngine.random(canvas_length=cfg.canvas_length, device=cfg.device, dtype=cfg.dtype,
                                   max_position_embeddings=65_536)
        return e, "tiny DiffusionGemma with random weights (hidden 64, 2 layers, 4 experts; byte tokenizer)"
    if cfg.model == "random:diffusiongemma-26b-a4b":
        e = DiffusionEngine.random(preset="diffusiongemma-26b-a4b", canvas_length=256, device=cfg.device,
                                   dtype=cfg.dtype, vocab_size=262_144, max_position_embeddings=32_768)
        return e, ("DiffusionGemma 26B-A4B architecture (approximate config, see engine/models.py) with random "
                   "weights: speed only, outputs meaningless")
    path = BUILTIN_MODEL_DIR if cfg.model == "builtin" else Path(cfg.model)
    e = DiffusionEngine.from_pretrained(path, device=cfg.device, dtype=cfg.dtype)
    return e, f"checkpoint {path}"


def run(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from .builtin import BUILTIN_MODEL_DIR, card_options, model_card

    engine, weights = make_engine(cfg)
    ar = _ar_model(engine, cfg.seed)
    card_dir = BUILTIN_MODEL_DIR if cfg.model == "builtin" else cfg.model
    card = model_card(card_dir) if not cfg.model.startswith("random") else {}
    domain = cfg.domain if cfg.domain != "auto" else ("demo" if card else "realistic")
    if domain not in ("demo", "realistic"):
        raise ValueError(f"domain must be 'auto', 'demo' or 'realistic', got {cfg.domain!r}")
    by_name = {t["name"]: t for t in (demo_tool_schemas() if domain == "demo" else bench_tools())}
    scenario_list = demo_scenarios(cfg.quick) if domain == "demo" else scenarios(cfg.quick)
    # A model agentloop trained is prompted as it was trained (its instructions, maybe no declarations).
    prompting = {"instructions": card["instructions"], "declare_tools": card.get("declare_tools", True)} \
        if card else {}
    # ... and sampled as its card recommends (temperatures, entropy bound), as demo_agent() does.
    steps = {"fixed_steps": bool(cfg.steps), **({"max_denoising_steps": cfg.steps} if cfg.steps else {})}
    options = card_options(card_dir, **steps) if card else GenerationOptions(**{"max_denoising_steps": 48, **steps})
    todo = [s for s in scenario_list if not cfg.only or any(s.name.startswith(o) for o in cfg.only)]
    # A scenario longer than the model's context cannot run (the engine raises rather than
    # truncate): say so in the results instead of failing the whole benchmark at its end.
    limit = engine.model.config.get_text_config().max_position_embeddings
    skipped = {s.name: f"needs {n} positions, the model has {limit}"
               for s in todo if (n := _positions(s, by_name, prompting, engine)) > limit}
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    todo = [s for s in todo if s.name not in skipped]
    records: list[TurnRecord] = []
    grammars: dict[tuple[str, ...], CompiledGrammar] = {}
    for s in todo:
        tools = [by_name[n] for n in s.tools]
        if s.tools not in grammars:
            t = time.perf_counter()
            grammars[s.tools] = compile_tools(tools, engine.tokenizer, "gemma4")
            log(f"compiled {len(tools)} tools in {time.perf_counter() - t:.1f} s")
    meta = {"config": asdict(cfg), "weights": weights, "domain": domain, "machine": machine_info(engine),
            "autoregressive": f"LlamaForCausalLM, random weights, forced lengths, "
                              f"{sum(p.numel() for p in ar.parameters()) / 1e6:.2f}M params",
            "diffusion_params_m": sum(p.numel() for p in engine.model.parameters()) / 1e6, "skipped": skipped,
            "sampler": {"t_max": options.t_max, "t_min": options.t_min, "entropy_bound": options.entropy_bound,
                        "source": "model card" if card else "GenerationOptions defaults"}}
    if not todo:
        return {**meta, "summary": [], "turns": []}
    # Warm up every contender once (JIT-compiled kernels, per-canvas DP supports, allocator)
    # so that the first measured turn is not the first ever.
    warm = todo[0]
    for kind in CONTENDERS:
        conv = Conversation(Protocol("gemma4"), [by_name[n] for n in warm.tools], **prompting)
        runner_w: Any = (_Autoregressive(ar, engine, grammars[warm.tools], conv) if kind == "autoregressive"
                         else _Diffusion(kind, engine, grammars[warm.tools], conv, options, cfg.retries))
        runner_w.turn(warm.turns[0], conv.before(warm.turns[0], True), cfg.seed)
    for r in range(cfg.repeats):
        for s in todo:
            tools = [by_name[n] for n in s.tools]
            g = grammars[s.tools]
            for kind in CONTENDERS:
                conv = Conversation(Protocol("gemma4"), tools, **prompting)
                runner: Any = (_Autoregressive(ar, engine, g, conv) if kind == "autoregressive"
                               else _Diffusion(kind, engine, g, conv, options, cfg.retries))
                first = True
                for i, turn in enumerate(s.turns):
                    before = conv.before(turn, first)
                    t0 = time.perf_counter()
                    parts, steps, forced, n_out, prefill, valid, tries = runner.turn(turn, before, cfg.seed + i)
                    # The tools return canned results at once: a real tool's time adds the same
                    # to every contender. Feeding the results back (tokenizing) is timed.
                    after = conv.after(turn)
                    runner.append(after)
                    wall = time.perf_counter() - t0
                    parts["overhead"] = max(0.0, wall - sum(v for k, v in parts.items() if k != "overhead"))
                    first = isinstance(turn.output, str)
                    useful = len(conv.output_ids(engine, turn)) + 1
                    records.append(TurnRecord(s.name, kind, r, i, wall, parts, steps, forced, n_out, prefill, valid,
                                              tries, useful))
                log(f"repeat {r + 1}/{cfg.repeats} {s.name}: {kind} done")
    return {**meta, "summary": summarize(records), "turns": [asdict(x) for x in records]}


def _positions(s: Scenario, by_name: dict[str, Any], prompting: dict[str, Any], engine: DiffusionEngine) -> int:
    """Positions the scenario's whole conversation needs, plus one canvas to write into."""
    conv = Conversation(Protocol("gemma4"), [by_name[n] for n in s.tools], **prompting)
    segments = conv.system()
    first = True
    for turn in s.turns:
        segments += conv.before(turn, first) + conv.output(turn) + conv.after(turn)
        first = isinstance(turn.output, str)
    return len(encode_segments(engine.tokenizer, segments)) + engine.canvas_length


def machine_info(engine: DiffusionEngine) -> dict[str, Any]:
    """Where figures were taken: platform, processor, torch, threads, device, dtype (and the GPU)."""
    d = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(engine.device),
         "dtype": str(engine.dtype)}
    if engine.device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(engine.device)
    return d


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def summarize(records: Sequence[TurnRecord]) -> list[dict[str, Any]]:
    rows = []
    keys = list(dict.fromkeys((x.scenario, x.contender) for x in records))
    base: dict[str, float] = {}
    for scen, kind in keys:
        rs = [x for x in records if x.scenario == scen and x.contender == kind]
        med = statistics.median(x.wall_s for x in rs)
        if kind == "agentloop":
            base[scen] = med
        rows.append({
            "scenario": scen, "contender": kind, "turns": len(rs),
            "median_ms": 1000 * med, "p95_ms": 1000 * _pct([x.wall_s for x in rs], 0.95),
            **{f"{p}_ms": 1000 * statistics.median(x.parts[p] for x in rs) for p in PARTS},
            "steps": statistics.median(x.steps for x in rs),
            "forced_tokens": statistics.median(x.forced_tokens for x in rs),
            "prefill_tokens": statistics.median(x.prefill_tokens for x in rs),
            "tokens_per_s": statistics.median(x.useful_tokens / x.wall_s for x in rs),
            "valid": (sum(bool(x.valid) for x in rs) / len(rs)) if rs[0].valid is not None else None,
            "retries": sum(x.retries for x in rs),
            "failures": sum(x.valid is False for x in rs),
        })
    for row in rows:
        b = base.get(row["scenario"])
        row["ratio_to_agentloop"] = row["median_ms"] / (1000 * b) if b else None
    return rows


# ---- reporting -----------------------------------------------------------------------------------


def describe_machine(m: dict[str, Any]) -> str:
    """``machine_info`` as one line of a report."""
    return f"{m.get('gpu', m['processor'])}, {m['platform']}, torch {m['torch']}, {m['threads']} threads, {m['dtype']}"


def to_markdown(res: dict[str, Any], command: str) -> str:
    lines = ["# Loop-latency benchmark", "",
             f"Command: `{command}`. Machine: {describe_machine(res['machine'])}. Weights: {res['weights']} "
             f"({res['diffusion_params_m']:.2f}M params). Tools and conversations: {res.get('domain', 'realistic')}. "
             f"Autoregressive contender: {res['autoregressive']}. "
             f"Steps per canvas: {res['config']['steps'] or 'adaptive'}"
             + (f" (temperature {sp['t_max']} -> {sp['t_min']}, entropy bound {sp['entropy_bound']}: {sp['source']})"
                if (sp := res.get("sampler")) else "")
             + f". Repeats: {res['config']['repeats']}, "
             "contenders interleaved; per-turn medians and p95. Valid: the turn's kind of output (calls or "
             "answer) with schema-valid calls, the same test for every contender (n/a for the forced-length "
             "autoregressive contender); tok/s counts the turn's scripted output tokens."
             + "".join(f" Skipped {k}: {v}." for k, v in res.get("skipped", {}).items()), "",
             "| scenario | contender | median ms | p95 ms | x agentloop | encode | denoise | constraint | sampler | "
             "tool | overhead | steps | forced | tok/s | valid | retries |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["summary"]:
        lines.append(
            f"| {r['scenario']} | {r['contender']} | {r['median_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['ratio_to_agentloop']:.2f} | {r['encode_ms']:.0f} | {r['denoise_ms']:.0f} | {r['constraint_ms']:.0f} | "
            f"{r['sampler_ms']:.0f} | {r['tool_ms']:.1f} | {r['overhead_ms']:.0f} | {r['steps']:.0f} | "
            f"{r['forced_tokens']:.0f} | {r['tokens_per_s']:.0f} | {_pct_str(r['valid'])} | {r['retries']} |")
    return "\n".join(lines) + "\n"


def _pct_str(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"agentloop bench: {res['weights']}")
    for col in ("scenario", "contender", "median ms", "p95 ms", "x agentloop", "denoise", "constraint", "encode",
                "steps", "valid"):
        t.add_column(col, justify="left" if col in ("scenario", "contender") else "right")
    for r in res["summary"]:
        t.add_row(r["scenario"], r["contender"], f"{r['median_ms']:.0f}", f"{r['p95_ms']:.0f}",
                  f"{r['ratio_to_agentloop']:.2f}", f"{r['denoise_ms']:.0f}", f"{r['constraint_ms']:.0f}",
                  f"{r['encode_ms']:.0f}", f"{r['steps']:.0f}", _pct_str(r["valid"]))
    Console(stderr=True, width=max(160, Console(stderr=True).width)).print(t)


def plot(res: dict[str, Any], path: Path) -> None:
    """Stacked median latency breakdown per scenario and contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["summary"]
    labels = [f"{r['scenario']}\n{r['contender']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 6))
    bottom = [0.0] * len(rows)
    for part in PARTS:
        vals = [r[f"{part}_ms"] for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("median ms per turn")
    ax.set_title(f"Loop latency per turn ({res['weights'][:60]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], out: Path, command: str, name: str | None = None) -> dict[str, Path]:
    """loop.json, loop.md and (with matplotlib installed: ``pip install agentloop[bench]``)
    loop.png; ``loop-<name>.*`` with a name."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"loop-{name}" if name else "loop"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps({"command": command, **res}, indent=1, default=str))
    paths["md"].write_text(to_markdown(res, command))
    try:
        plot(res, paths["png"])
    except ImportError:
        del paths["png"]
    return paths


__all__ = ["BenchConfig", "Scenario", "Turn", "bench_tools", "demo_scenarios", "demo_tool_schemas", "run", "scenarios",
           "summarize", "write"]
