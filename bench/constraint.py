"""Constraint benchmark: grammar compile cost and per-step canvas DP cost, side by side
with the decoder forward of a tiny random DiffusionGemma at the same vocabulary size.

For tool sets of 1, 5 and 20 tools (``agentloop/data/tool_schemas.json``) x three offline
tokenizers (``bench/tokenizers_offline.py``: ~4k byte BPE, 30k WordPiece, 262k Gemma 3)
x wire format gemma4 it measures

* compile time cold (in-memory grammar and vocabulary caches cleared, on-disk grammar
  cache pointed at an empty temporary folder, so the cold time includes writing the
  entry), from disk (a new process's first call: memory caches cleared, the entry just
  written is loaded) and cached (same process, second call), with the cold compile split
  into phases: vocabulary mapping, schema -> per-tool DFAs
  (``to_dfa`` of each tool's arguments), envelope ``to_dfa``, DFA minimisation (inside
  both) and ``build_token_automaton``;
* automaton sizes and memory (``g.stats``);
* per denoising step, at L=256 on random logits (median of N repeats after warmup):
  ``viterbi``, ``sample``, ``marginals(return_entropy=True)`` and ``denoise_step`` (all
  three sharing one pass over the logits, where the grammar has it; called as the engine
  calls it, writing the marginals into a buffer reused every step), plus the part of each
  spent in ``reduce_atoms`` (the one pass over the (L, V) logits), and, once per canvas,
  the support (the states on some valid canvas at each position, shared by the canvas's
  steps; a new canvas starts from a new state). Beside them, what the engine runs in the
  step's place without a grammar: ``fused_draw`` (sample, argmax and entropy in one pass
  over the logits). Each repeat follows a ``gc.collect()``, which leaves the caches cold;
  the same ops are timed again right after a decoder forward, with the logits just
  written (the engine's situation: the forward evicts the grammar's tables, and its
  logits are in cache);
* the decoder forward of a tiny random ``DiffusionGemmaForBlockDiffusion`` with the same
  vocab: one denoising step = ``model(cache=<prompt KV cache>, decoder_input_ids=<256-token
  canvas>, decoder_position_ids=..., self_conditioning_logits=<previous step's logits>)``
  after the prompt has been encoded once into a ``DynamicCache`` (exactly what
  ``generate()`` calls per step; the encoder is not timed). Each constraint op is reported
  as a percentage of that forward (target: <= 5% at 4k vocab);
* outlines-core as an alternative compiler: for the json wire format, the regex of each
  tool's arguments (``build_regex_from_schema``, no whitespace) -> ``Index(regex,
  Vocabulary)`` build time, against our ``compile_schema(arguments, wire_format="json")``.

Run from the repository root::

    python bench/constraint.py            # full run (several minutes; 262k included)
    python bench/constraint.py --quick    # tiny smoke configuration (seconds)

Writes ``bench/results/constraint.json`` and ``constraint.md`` (``--out`` to change) and
prints a table. Timings are medians; the machine is noisy (see the recorded platform).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import agentloop.grammar as G  # noqa: E402
from agentloop.engine.sampling import fused_draw  # noqa: E402
from agentloop.grammar import canvas as dp  # noqa: E402
from agentloop.grammar import device_passes  # noqa: E402
from agentloop.grammar import fsa  # noqa: E402
from bench.tokenizers_offline import LOADERS, tool_schemas  # noqa: E402

WIRE_FORMAT = "gemma4"


# ---- configuration --------------------------------------------------------------------------


@dataclass
class ModelSize:
    """The tiny random DiffusionGemma timed next to the constraint (vocab = tokenizer's)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 256


@dataclass
class Config:
    tokenizers: list[str] = field(default_factory=lambda: list(LOADERS))
    tool_sets: list[int] = field(default_factory=lambda: [1, 5, 20])
    length: int = 256
    prompt: int = 64
    repeats: int = 7
    warmup: int = 2
    outlines_tools: int = 5
    model: ModelSize = field(default_factory=ModelSize)
    seed: int = 0
    #: tool sets this large compile their symbol DFAs once (first tokenizer) and replay them
    #: for the other tokenizers: the DFAs do not depend on the vocabulary, and building them
    #: for 20 tools takes minutes (see the phases table). 0: never reuse.
    reuse_dfa_min_tools: int = 20
    #: numba threading layer for the parallel DP kernels ("" = numba's default choice)
    threading_layer: str = ""
    #: torch and numba threads (0: leave the libraries' defaults). One thread by default:
    #: on a small shared machine a multi-threaded region waits for every worker, and a
    #: worker descheduled by another process costs a scheduler quantum per region, which
    #: made the same tiny forward measure anywhere from 8 to 540 ms with 2 threads.
    threads: int = 1
    #: repeats of each host step op timed right after a decoder forward (0: skip)
    after_forward_repeats: int = 5
    #: time only the GPU step ops (a GPU lease is short; the host ops are this CPU's table)
    cuda_only: bool = False
    #: where the results so far are written after each tool set (None: only at the end)
    partial_out: Path | None = None

    @classmethod
    def quick(cls) -> "Config":
        return cls(tokenizers=["bpe-4k"], tool_sets=[1], length=64, prompt=16, repeats=3, warmup=1,
                   after_forward_repeats=2, outlines_tools=1, reuse_dfa_min_tools=0, model=ModelSize(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                     num_experts=2, top_k_experts=1, moe_intermediate_size=64))


# ---- timing helpers ---------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) wall time in ms of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


@dataclass
class Phases:
    """Wall time of the compile phases, collected by wrapping the grammar's functions."""

    vocabulary: float = 0.0
    tool_dfas: float = 0.0  # to_dfa of each tool's arguments (before the envelope)
    envelope_dfa: float = 0.0  # the final to_dfa of the whole language
    minimize: float = 0.0  # fsa.minimize, inside both of the above (and in schema products)
    token_automaton: float = 0.0
    disk_save: float = 0.0
    to_dfa_calls: list[float] = field(default_factory=list)


@contextlib.contextmanager
def phase_timer() -> Iterator[Phases]:
    """Patch agentloop.grammar's module globals with timing wrappers (restored on exit).

    ``compile_tools`` looks ``to_dfa``, ``build_token_automaton`` and ``_vocabulary`` up
    in ``agentloop.grammar``'s namespace and ``to_dfa`` looks ``minimize`` up in ``fsa``'s,
    so wrapping those names times each phase without touching the package's code.
    """
    ph = Phases()
    saved = (G.to_dfa, G.build_token_automaton, G._vocabulary, fsa.minimize)
    to_dfa, bta, vocabulary, minimize = saved
    disk = getattr(G, "disk_cache", None)
    disk_save = getattr(disk, "save", None)

    def timed_save(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return disk_save(*a, **k)  # type: ignore[misc]
        finally:
            ph.disk_save += time.perf_counter() - t0

    def timed_to_dfa(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return to_dfa(*a, **k)
        finally:
            ph.to_dfa_calls.append(time.perf_counter() - t0)

    def timed_bta(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return bta(*a, **k)
        finally:
            ph.token_automaton += time.perf_counter() - t0

    def timed_vocabulary(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return vocabulary(*a, **k)
        finally:
            ph.vocabulary += time.perf_counter() - t0

    def timed_minimize(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return minimize(*a, **k)
        finally:
            ph.minimize += time.perf_counter() - t0

    G.to_dfa, G.build_token_automaton, G._vocabulary, fsa.minimize = (
        timed_to_dfa, timed_bta, timed_vocabulary, timed_minimize)
    if disk_save is not None:
        disk.save = timed_save  # type: ignore[union-attr]
    try:
        yield ph
    finally:
        G.to_dfa, G.build_token_automaton, G._vocabulary, fsa.minimize = saved
        if disk_save is not None:
            disk.save = disk_save  # type: ignore[union-attr]
        if ph.to_dfa_calls:  # the envelope's to_dfa is the last call of a compile
            ph.envelope_dfa = ph.to_dfa_calls[-1]
            ph.tool_dfas = sum(ph.to_dfa_calls[:-1])


class DfaReplay:
    """Record the symbol DFAs of a compile (in call order) and hand them back, instead of
    rebuilding them, in a later compile of the same tools for another tokenizer.

    Valid because ``compile_tools`` builds its DFAs from the schemas and the wire format
    only, except the canvas tail, which depends on whether pad and stop are one token
    (part of the key, with the schemas: ``tool_schemas`` lower-cases them for an
    uncased tokenizer).
    """

    def __init__(self) -> None:
        self.recorded: dict[tuple[Any, ...], list[Any]] = {}

    @contextlib.contextmanager
    def around(self, key: tuple[Any, ...]) -> Iterator[bool]:
        """Patch ``agentloop.grammar.to_dfa``; yields True when the DFAs are replayed."""
        inner = G.to_dfa
        replay = key in self.recorded
        calls: list[Any] = [] if replay else self.recorded.setdefault(key, [])
        it = iter(self.recorded[key]) if replay else None

        def to_dfa(*a: Any, **k: Any) -> Any:
            if it is not None:
                return next(it)
            d = inner(*a, **k)
            calls.append(d)
            return d

        G.to_dfa = to_dfa
        try:
            yield replay
        finally:
            G.to_dfa = inner


@contextlib.contextmanager
def disk_cache_at(folder: Path) -> Iterator[None]:
    """Point agentloop's on-disk grammar cache (``AGENTLOOP_CACHE_DIR``) at ``folder``."""
    old = os.environ.get("AGENTLOOP_CACHE_DIR")
    os.environ["AGENTLOOP_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            del os.environ["AGENTLOOP_CACHE_DIR"]
        else:
            os.environ["AGENTLOOP_CACHE_DIR"] = old


def clear_grammar_caches() -> None:
    """Fresh process state for a cold compile: compiled grammars, the per-tool argument
    DFAs and hole envelopes memoised across compiles, and vocabulary maps (a tool set that
    shares tools with the previous one must not reuse their DFAs, or the compile is not
    cold and ``DfaReplay`` records fewer DFAs than a cold compile asks for)."""
    G.clear_caches()
    with G._lock:
        G._holed.clear()
        G._vocab_cache.clear()


# ---- the model side ---------------------------------------------------------------------------


def tiny_diffusion_gemma(vocab_size: int, size: ModelSize, seed: int) -> torch.nn.Module:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads, head_dim=size.head_dim, global_head_dim=size.head_dim,
        num_experts=size.num_experts, top_k_experts=size.top_k_experts,
        moe_intermediate_size=size.moe_intermediate_size, max_position_embeddings=4096,
        layer_types=["sliding_attention"] * (size.num_hidden_layers - 1) + ["full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = Gemma4VisionConfig(num_hidden_layers=0, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=vocab_size - 3,
                               eoi_token_id=vocab_size - 2, image_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


def decoder_forward(vocab_size: int, cfg: Config) -> tuple[Callable[[], None], int]:
    """One denoising-step decoder forward over a cached prompt (the prompt is encoded
    once, here), and the model's parameter count."""
    from transformers import DynamicCache

    model = tiny_diffusion_gemma(vocab_size, cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    P, L = cfg.prompt, cfg.length
    prompt = torch.randint(0, vocab_size, (1, P), generator=gen)
    canvas = torch.randint(0, vocab_size, (1, L), generator=gen)
    pos = torch.arange(P, P + L)[None]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config.text_config)
        cache = model.model.encoder(input_ids=prompt, cache=cache, position_ids=torch.arange(P)[None]).cache
        sc = model(cache=cache, decoder_input_ids=canvas, decoder_position_ids=pos).logits

    def step() -> None:
        with torch.inference_mode():
            model(cache=cache, decoder_input_ids=canvas, decoder_position_ids=pos, self_conditioning_logits=sc)
        assert cache.get_seq_length() == P, "the decoder must not grow the prompt cache"

    return step, sum(p.numel() for p in model.parameters())


def time_forward(forward: Callable[[], None], params: int, cfg: Config) -> dict[str, Any]:
    """Median wall time of the decoder forward."""
    ms, ms_min = time_ms(forward, cfg.repeats, cfg.warmup)
    return {"forward_ms": ms, "forward_min_ms": ms_min, "params": params, "prompt": cfg.prompt, "canvas": cfg.length,
            "torch_threads": torch.get_num_threads()}


def time_after_forward(fn: Callable[[], Any], forward: Callable[[], None], logits: torch.Tensor,
                       fresh: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median, min) ms of ``fn`` run right after a decoder forward, its input ``logits``
    just overwritten with ``fresh`` (as the model's last layer writes them): the caches
    as the engine's constraint step finds them."""
    times = []
    for _ in range(repeats):
        forward()
        logits.copy_(fresh)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


# ---- the constraint side ----------------------------------------------------------------------


def compile_row(tok_name: str, tok: Any, aliases: dict[str, str], tools: list[dict[str, Any]],
                replay: DfaReplay | None, disk_dir: Path) -> tuple[Any, dict[str, Any]]:
    clear_grammar_caches()
    gc.collect()
    replayed = False
    with contextlib.ExitStack() as stack:
        stack.enter_context(disk_cache_at(disk_dir / f"{tok_name}-{len(tools)}"))  # empty: a cold compile
        if replay is not None:
            vocab = G._vocabulary(tok, G.load_wire_format(WIRE_FORMAT), None, None, aliases)
            clear_grammar_caches()
            # (keyed by the schemas themselves: an uncased tokenizer's are lower-cased, other DFAs)
            replayed = stack.enter_context(replay.around((json.dumps(tools, sort_keys=True),
                                                          vocab.pad_id == vocab.stop_id)))
        ph = stack.enter_context(phase_timer())  # inside the replay patch: replays time ~0
        t0 = time.perf_counter()
        g = G.compile_tools(tools, tok, WIRE_FORMAT, aliases=aliases)
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    g2 = G.compile_tools(tools, tok, WIRE_FORMAT, aliases=aliases)
    cached = time.perf_counter() - t0
    assert g2 is g, "second compile_tools call must hit the cache"
    # a new process's first call: memory caches empty, the entry just written on disk
    with disk_cache_at(disk_dir / f"{tok_name}-{len(tools)}"):
        clear_grammar_caches()
        G._vocabulary(tok, G.load_wire_format(WIRE_FORMAT), None, None, aliases)  # vocabulary map timed apart
        t0 = time.perf_counter()
        G.compile_tools(tools, tok, WIRE_FORMAT, aliases=aliases)
        from_disk = time.perf_counter() - t0
    st = g.stats
    phases = asdict(ph)
    phases.pop("to_dfa_calls")
    phases["schema_other"] = max(0.0, cold - ph.vocabulary - ph.tool_dfas - ph.envelope_dfa - ph.token_automaton
                                 - ph.disk_save)
    return g, {
        "tokenizer": tok_name, "vocab": st.vocab_size, "n_tools": len(tools), "cold_s": cold, "cached_s": cached,
        "disk_s": from_disk,
        "dfa_replayed": replayed,
        "phases_s": phases, "dfa_states": st.dfa_states, "atoms": st.atoms, "groups": st.groups,
        "edges": st.edges, "nbytes": st.nbytes,
    }


def step_row(g: Any, cfg: Config, forward_ms: float, forward: Callable[[], None] | None = None) -> dict[str, Any]:
    V = g.vocab.size
    gen = torch.Generator().manual_seed(cfg.seed)
    fresh = torch.randn(cfg.length, V, generator=gen) * 2.0
    logits = fresh.clone()  # what the ops read (after a forward: rewritten from ``fresh``)
    x = logits.numpy()
    ta = g.automaton
    atoms = dp.sorted_atoms(ta.atom_of_token, ta.n_atoms)
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    step_out = torch.empty_like(logits)
    ops: dict[str, Callable[[], Any]] = {} if cfg.cuda_only else {
        "viterbi": lambda: g.viterbi(logits),
        "sample": lambda: g.sample(logits, generator=sampler),
        "marginals": lambda: g.marginals(logits, return_entropy=True),
        # the one pass over the logits inside each op (numba, parallel over positions)
        "reduce_max": lambda: dp.reduce_atoms(x, atoms, False, False),
        "reduce_sum": lambda: dp.reduce_atoms(x, atoms, True, False),
        "reduce_sum_x": lambda: dp.reduce_atoms(x, atoms, True, True),
        # all three sharing one pass over the logits, called as the engine calls it: the
        # marginals go into its self-conditioning buffer, reused every step (a fresh (L, V)
        # tensor costs its page faults: ~0.35 s at 262k right after a forward)
        "denoise_step": lambda: g.denoise_step(logits, generator=sampler, out=step_out),
        # the same over the whole lattice: every op above runs over the cells pruning
        # keeps (grammar/pruning.py), by default
        "denoise_step_whole": lambda: g.denoise_step(logits, generator=sampler, out=step_out, prune=False),
        # what the engine runs in the step's place without a grammar (sample, argmax and
        # entropy in one pass; temperature 1 leaves the logits as they are)
        "draw_unconstrained": lambda: fused_draw(logits[None], 1.0, sampler),
        # once per canvas, not per step: the states on some valid canvas at each position,
        # which every step of that canvas reuses (a new canvas starts from a new state)
        "support": lambda: (g._support_cache.clear(), g._support(cfg.length, g.start_state, False)),
    }
    on_gpu = logits.cuda() if torch.cuda.is_available() else None
    if on_gpu is not None:
        ops.update(cuda_ops(g, on_gpu, sampler))
    row: dict[str, Any] = {"forward_ms": forward_ms}
    if not cfg.cuda_only:
        from bench.pruning import kept_share  # (bench.pruning imports this module)

        row["kept_share"] = kept_share(g, logits, g.start_state, False)
    for name, fn in ops.items():
        _time_into(row, name, fn, cfg)
    if on_gpu is not None:
        row.update(cuda_step_split(g, on_gpu, sampler, cfg.repeats))
    if cfg.cuda_only:  # no host ops, no CPU forward to compare with
        return row
    for name in ("viterbi", "sample", "marginals", "denoise_step", "denoise_step_whole", "draw_unconstrained"):
        if f"{name}_ms" in row:
            row[f"{name}_pct"] = 100.0 * row[f"{name}_ms"] / forward_ms
        if forward is not None and cfg.after_forward_repeats:
            ms, ms_min = time_after_forward(ops[name], forward, logits, fresh, cfg.after_forward_repeats)
            row[f"{name}_after_forward_ms"], row[f"{name}_after_forward_min_ms"] = ms, ms_min
            row[f"{name}_after_forward_pct"] = 100.0 * ms / forward_ms
    row["viterbi_dp_ms"] = row["viterbi_ms"] - row["reduce_max_ms"]
    row["sample_dp_ms"] = row["sample_ms"] - row["reduce_sum_ms"]
    row["marginals_dp_ms"] = row["marginals_ms"] - row["reduce_sum_x_ms"]
    return row


def _time_into(row: dict[str, Any], name: str, fn: Callable[[], Any], cfg: Config) -> None:
    try:
        row[f"{name}_ms"], row[f"{name}_min_ms"] = time_ms(fn, cfg.repeats, cfg.warmup)
    except Exception as e:  # noqa: BLE001 - a GPU variant that fails is recorded, the others still run
        if "cuda" not in name:
            raise
        row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
        log(f"{name} failed: {row[f'{name}_error']}")
    if "cuda" in name and f"{name}_ms" in row:
        log(f"  {name}: {row[f'{name}_ms']:.3f} ms")


def cuda_ops(g: Any, on_gpu: torch.Tensor, sampler: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The step with its logits on the GPU: the whole ``denoise_step`` (vocabulary passes
    on the device, the DP on the host), the same with the logits copied to the host and the
    marginals back, and its device parts apart: the atom reduction per kernel and chunk size
    (chunk 1 is a scatter straight from the vocabulary) and the marginals write."""
    V = on_gpu.shape[1]
    ta = g.automaton
    sync = torch.cuda.synchronize

    def step() -> None:
        g.denoise_step(on_gpu, generator=sampler)
        sync()

    def via_host() -> None:
        out = g.denoise_step(on_gpu.cpu(), generator=sampler)
        out.log_marginals.cuda()
        sync()

    ops: dict[str, Callable[[], Any]] = {"denoise_step_cuda": step, "denoise_step_cuda_via_host": via_host}
    layout = g._atom_layout(V, on_gpu.device)
    kernels = ["torch"] + (["triton"] if device_passes._triton_available() else [])
    for chunk in sorted({1, 8, layout.chunk}):
        lay = device_passes.atom_layout(g._atom_of(V), ta.n_atoms, on_gpu.device, chunk=chunk)
        ops[f"reduce_cuda_torch_c{chunk}"] = lambda lay=lay: device_passes.reduce_atoms(on_gpu, lay, True, True,
                                                                                       kernel="torch")
    if "triton" in kernels:  # the Triton tiles (c: tokens per tile), checked against the torch ops here
        try:
            want = device_passes.reduce_atoms(on_gpu, layout, True, True, kernel="torch")
            got = device_passes.reduce_atoms(on_gpu, layout, True, True, kernel="triton")
            rel = [float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300), initial=0.0))
                   for a, b in zip(got[2:4], want[2:4])]
            log(f"  triton vs torch reduce: rowmax equal {np.array_equal(got[1], want[1])}, amax equal "
                f"{np.array_equal(got[4], want[4])}, aarg equal {np.array_equal(got[5], want[5])}, "
                f"asum / asumx max rel diff {rel[0]:.2e} / {rel[1]:.2e}")
        except Exception as e:  # noqa: BLE001 - recorded by the timed ops below too
            log(f"  triton reduce failed: {type(e).__name__}: {str(e)[:400]}")
        for tile in (1024, 4096, 16384):
            lay = device_passes.atom_layout(g._atom_of(V), ta.n_atoms, on_gpu.device, tile=tile)
            ops[f"reduce_cuda_triton_c{tile}"] = (
                lambda lay=lay: device_passes.reduce_atoms(on_gpu, lay, True, True, kernel="triton"))
    rowmax, rowmax_host, asum, _, amax, aarg = device_passes.reduce_atoms(on_gpu, layout, True, False)
    L = on_gpu.shape[0]
    log_f = np.log(np.random.default_rng(0).random((L, ta.n_atoms)))  # (L, K) log atom factors
    refs = device_passes.atom_references(log_f, amax, rowmax_host)  # (2, L, K + 1)
    # a draw at every position inside its heaviest atom (the largest, mostly), past its best token
    atoms = asum.argmax(axis=1)  # (L,)
    rows = np.arange(L)
    best = aarg[rows, atoms]
    u = np.random.default_rng(1).random(L)
    for kernel in kernels:
        def marginals(kernel: str = kernel) -> None:
            device_passes.log_marginals(on_gpu, refs, layout.index, kernel=kernel)
            sync()

        def draws(kernel: str = kernel) -> None:  # (its tokens come back to the host: synchronised)
            device_passes.tokens_in_atoms(on_gpu, layout, atoms, best, amax[rows, atoms], rowmax_host,
                                          asum[rows, atoms], u, kernel=kernel)

        ops[f"marginals_cuda_{kernel}"] = marginals
        ops[f"draw_cuda_{kernel}"] = draws
    return ops


def cuda_step_split(g: Any, on_gpu: torch.Tensor, sampler: torch.Generator, repeats: int) -> dict[str, float]:
    """Where a GPU ``denoise_step`` spends its time: each device pass timed inside the step
    (synchronised before and after), the host's share (the DP over the automaton, group
    sums, sampling the atoms) the rest. Mean ms per step over ``repeats`` steps."""
    names = ("reduce_atoms", "tokens_in_atoms", "log_marginals")
    spent = dict.fromkeys(names, 0.0)
    originals = {name: getattr(device_passes, name) for name in names}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t0
            return out
        return run

    total = 0.0
    try:
        for name, fn in originals.items():
            setattr(device_passes, name, timed(name, fn))
        g.denoise_step(on_gpu, generator=sampler)  # warm
        spent.update(dict.fromkeys(names, 0.0))
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.denoise_step(on_gpu, generator=sampler)
            torch.cuda.synchronize()
            total += time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(device_passes, name, fn)
    out = {f"split_{name}_ms": 1e3 * v / repeats for name, v in spent.items()}
    out["split_total_ms"] = 1e3 * total / repeats
    out["split_host_ms"] = out["split_total_ms"] - sum(out[f"split_{name}_ms"] for name in names)
    log("  split: " + ", ".join(f"{k[6:-3]} {v:.3f}" for k, v in out.items()))
    return out


# ---- outlines-core ----------------------------------------------------------------------------


def outlines_rows(tok_name: str, tok: Any, tools: list[dict[str, Any]], disk_dir: Path) -> list[dict[str, Any]]:
    """Index(regex, Vocabulary) build time vs our compile_schema(json) per tool."""
    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as e:  # pragma: no cover - optional
        return [{"tokenizer": tok_name, "error": f"outlines-core unavailable: {e}"}]

    # Our vocabulary mapping (json wire format) gives each token's bytes: reuse it so both
    # compilers see exactly the same token spellings.
    vocab = G._vocabulary(tok, G.load_wire_format("json"), None, None, None)
    t0 = time.perf_counter()
    by_bytes: dict[bytes, list[int]] = {}
    for i, syms in enumerate(vocab.token_symbols):
        if syms and i != vocab.stop_id and max(syms) < 256:
            by_bytes.setdefault(bytes(syms), []).append(i)
    oc_vocab = oc.Vocabulary(vocab.stop_id, by_bytes)
    vocab_s = time.perf_counter() - t0

    rows = []
    for t in tools:
        row: dict[str, Any] = {"tokenizer": tok_name, "vocab": vocab.size, "tool": t["name"],
                               "outlines_vocab_s": vocab_s}
        try:
            regex = build_regex_from_schema(json.dumps(t["parameters"]), whitespace_pattern="")
            row["regex_chars"] = len(regex)
            t0 = time.perf_counter()
            index = oc.Index(regex, oc_vocab)
            row["outlines_index_s"] = time.perf_counter() - t0
            row["outlines_states"] = len(index.get_transitions())
        except Exception as e:  # noqa: BLE001 - record what outlines-core says
            row["outlines_error"] = f"{type(e).__name__}: {e}"[:300]
        with G._lock:
            G._grammar_cache.clear()  # keep the vocabulary map: outlines' is built separately too
        with disk_cache_at(disk_dir / f"outlines-{tok_name}-{t['name']}"):  # empty: a cold compile
            t0 = time.perf_counter()
            g = G.compile_schema(t["parameters"], tok, "json")
            row["ours_compile_s"] = time.perf_counter() - t0
        row["ours_dfa_states"] = g.stats.dfa_states
        rows.append(row)
    return rows


# ---- driver -----------------------------------------------------------------------------------


def step_bench_options(ap: argparse.ArgumentParser, repeats: int, out: Path) -> None:
    """The options the side-by-side step benches share (log_space.py, pruning.py, masks.py)."""
    ap.add_argument("--tokenizer", default="bpe-4k", choices=sorted(LOADERS))
    ap.add_argument("--tools", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=out)


def step_bench_threads(threads: int) -> None:
    """torch's and numba's threads for a step bench (numba's capped at what it started with)."""
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def step_bench_command(script: str, argv: list[str] | None) -> str:
    """The command line a step bench ran as (``argv``: its arguments, None for sys.argv's)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python bench/{script}" + (" " + " ".join(args) if args else "")


def step_bench_header(title: str, command: str, threads: str) -> list[str]:
    """A step bench's results file's first lines: title, command, machine and code."""
    m, code = machine(), code_state()
    return [f"# {title}", "", f"Command: `{command}`  ",
            f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {threads}; torch {m['torch']}, numpy {m['numpy']}  ",
            f"Code: agentloop at {code['commit']}"
            + (f" (modified: {', '.join(code['modified'])})" if code["modified"] else "")]


def machine() -> dict[str, Any]:
    import transformers

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__,
        "numba_threads": numba.get_num_threads(), "numba_threading_layer": _threading_layer(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }


def code_state() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (the tree is shared)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in git("status", "--porcelain", "agentloop").splitlines()]}


def _threading_layer() -> str:
    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        return f"unset (config: {numba.config.THREADING_LAYER})"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: Config) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    result: dict[str, Any] = {"config": asdict(cfg), "wire_format": WIRE_FORMAT, "forward": [], "compile": [],
                              "step": [], "outlines": [], "load_average_start": os.getloadavg()}
    t_start = time.perf_counter()
    replay = DfaReplay()
    disk_dir = Path(tempfile.mkdtemp(prefix="agentloop-bench-"))
    for tok_name in cfg.tokenizers:
        t0 = time.perf_counter()
        tok, aliases = LOADERS[tok_name]()
        all_tools = tool_schemas(tok_name)
        V = tok.get_vocab_size(with_added_tokens=True)
        log(f"{tok_name}: vocab {V}, loaded in {time.perf_counter() - t0:.1f}s")
        forward = None
        if cfg.cuda_only:
            fwd = {"forward_ms": float("nan"), "params": 0, "torch_threads": torch.get_num_threads()}
        else:
            forward, params = decoder_forward(V, cfg)
            fwd = time_forward(forward, params, cfg)
        fwd.update(tokenizer=tok_name, vocab=V)
        result["forward"].append(fwd)
        log(f"{tok_name}: decoder forward {fwd['forward_ms']:.1f} ms")
        for n in cfg.tool_sets:
            reuse = bool(cfg.reuse_dfa_min_tools) and n >= cfg.reuse_dfa_min_tools
            g, crow = compile_row(tok_name, tok, aliases, all_tools[:n], replay if reuse else None, disk_dir)
            result["compile"].append(crow)
            log(f"{tok_name} x {n} tools: cold {crow['cold_s']:.2f}s{' (DFAs replayed)' if crow['dfa_replayed'] else ''}, "
                f"{crow['dfa_states']} states, "
                f"{crow['edges']} edges")
            srow = step_row(g, cfg, fwd["forward_ms"], forward)
            srow.update(tokenizer=tok_name, vocab=V, n_tools=n)
            result["step"].append(srow)
            if cfg.partial_out is not None:  # a GPU lease may end before the run does
                cfg.partial_out.write_text(json.dumps(result, indent=1, default=str))
            if not cfg.cuda_only:
                log(f"{tok_name} x {n} tools: viterbi {srow['viterbi_ms']:.2f} ms, sample {srow['sample_ms']:.2f} ms, "
                    f"marginals {srow['marginals_ms']:.2f} ms")
            del g
        if cfg.outlines_tools:
            result["outlines"].extend(outlines_rows(tok_name, tok, all_tools[: cfg.outlines_tools], disk_dir))
            log(f"{tok_name}: outlines-core done")
    shutil.rmtree(disk_dir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - t_start
    result["load_average_end"] = os.getloadavg()
    return result


# ---- reporting --------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def host_tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The compile and per-step tables of a full run (host ops and the CPU forward)."""
    step_of = {(r["tokenizer"], r["n_tools"]): r for r in result["step"]}
    main_rows = []
    for c in result["compile"]:
        s = step_of[(c["tokenizer"], c["n_tools"])]
        main_rows.append([
            c["tokenizer"], str(c["vocab"]), str(c["n_tools"]),
            f"{c['cold_s']:.2f}" + ("*" if c["dfa_replayed"] else ""), f"{c['disk_s'] * 1e3:.0f}",
            f"{c['cached_s'] * 1e6:.0f}",
            f"{c['dfa_states']}/{c['atoms']}/{c['groups']}/{c['edges']}", _fmt_bytes(c["nbytes"]),
            f"{s['forward_ms']:.1f}",
            f"{s['viterbi_ms']:.2f} ({s['viterbi_pct']:.1f}%)", f"{s['sample_ms']:.2f} ({s['sample_pct']:.1f}%)",
            f"{s['marginals_ms']:.2f} ({s['marginals_pct']:.1f}%)",
            f"{s['denoise_step_ms']:.2f} ({s['denoise_step_pct']:.1f}%)" if "denoise_step_ms" in s else "-",
            f"{s['draw_unconstrained_ms']:.2f} ({s['draw_unconstrained_pct']:.1f}%)"
            if "draw_unconstrained_ms" in s else "-",
        ])
    main = ("Compile and per-step cost (gemma4 wire format; step ops at L={L}, % of the decoder forward; "
            "* = symbol DFAs replayed from the first tokenizer's compile, vocabulary-dependent phases cold)".format(
        L=result["config"]["length"]),
        ["tokenizer", "V", "tools", "cold s", "disk ms", "cached us", "states/atoms/groups/edges", "memory", "forward ms",
         "viterbi ms", "sample ms", "marginals+H ms", "denoise_step ms", "no-grammar draw ms"], main_rows)
    phase_rows = []
    for c in result["compile"]:
        p = c["phases_s"]
        phase_rows.append([c["tokenizer"], str(c["n_tools"]), f"{c['cold_s']:.2f}" + ("*" if c["dfa_replayed"] else ""),
                           f"{p['vocabulary']:.2f}",
                           f"{p['tool_dfas']:.2f}", f"{p['envelope_dfa']:.2f}", f"{p['minimize']:.2f}",
                           f"{p['token_automaton']:.2f}", f"{p['disk_save']:.2f}", f"{p['schema_other']:.2f}"])
    phases = ("Cold compile phases (s); minimize is inside the two to_dfa columns",
              ["tokenizer", "tools", "cold", "vocabulary", "tool to_dfa", "envelope to_dfa", "(minimize)",
               "token automaton", "disk save", "other"], phase_rows)
    split_rows = []
    for s in result["step"]:
        split_rows.append([s["tokenizer"], str(s["n_tools"]), f"{s['reduce_max_ms']:.2f}", f"{s['viterbi_dp_ms']:.2f}",
                           f"{s['reduce_sum_ms']:.2f}", f"{s['sample_dp_ms']:.2f}", f"{s['reduce_sum_x_ms']:.2f}",
                           f"{s['marginals_dp_ms']:.2f}", f"{s['support_ms']:.2f}" if "support_ms" in s else "-"])
    split = ("Per-step split (ms): reduce_atoms (one pass over the logits) vs the rest (group scores + DP + output); "
             "and once per canvas, the support (the live states at each position, which the canvas's steps share)",
             ["tokenizer", "tools", "viterbi reduce", "viterbi rest", "sample reduce", "sample rest",
              "marginals reduce", "marginals rest", "support (per canvas)"], split_rows)
    prune_rows = [[s["tokenizer"], str(s["n_tools"]), f"{s['kept_share']:.2%}",
                   f"{s['denoise_step_whole_ms']:.2f} ({s['denoise_step_whole_pct']:.1f}%)",
                   f"{s['denoise_step_ms']:.2f} ({s['denoise_step_pct']:.1f}%)",
                   f"{s['denoise_step_ms'] / s['denoise_step_whole_ms']:.2f}x"]
                  for s in result["step"] if "denoise_step_whole_ms" in s]
    tables_ = [main]
    if prune_rows:
        tables_.append(("Pruning: every op above runs over the lattice cells that can carry weight or the Viterbi "
                        "canvas (grammar/pruning.py), by default; the step over the whole lattice (prune=False) "
                        "beside it (% of the forward); kept: the share of the support's cells the step runs on",
                        ["tokenizer", "tools", "kept", "denoise_step whole ms", "denoise_step ms", "ratio"],
                        prune_rows))
    af_rows = []
    for c in result["compile"]:
        s = step_of[(c["tokenizer"], c["n_tools"])]
        if "viterbi_after_forward_ms" not in s:
            continue
        af_rows.append([c["tokenizer"], str(c["vocab"]), str(c["n_tools"]), f"{s['forward_ms']:.1f}"] + [
            f"{s[f'{n}_after_forward_ms']:.2f} ({s[f'{n}_after_forward_pct']:.1f}%)"
            for n in ("viterbi", "sample", "marginals", "denoise_step", "draw_unconstrained")
            if f"{n}_after_forward_ms" in s])
    if af_rows:
        tables_.append(("Per-step cost right after a decoder forward (the engine's situation: the forward has just "
                        "written the logits, the caches as it left them; medians of {r}; % of the forward)".format(
                            r=result["config"].get("after_forward_repeats")),
                        ["tokenizer", "V", "tools", "forward ms", "viterbi ms", "sample ms", "marginals+H ms",
                         "denoise_step ms", "no-grammar draw ms"], af_rows))
    return tables_ + [phases, split]


def gpu_tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The GPU step table, where the run had a GPU (with ``--cuda-only`` also the automaton
    sizes and compile times, which the host table holds otherwise)."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    if result["config"].get("cuda_only"):
        out.append(("Grammars (gemma4 wire format)", ["tokenizer", "V", "tools", "cold compile s",
                                                      "states/atoms/groups/edges"],
                    [[c["tokenizer"], str(c["vocab"]), str(c["n_tools"]), f"{c['cold_s']:.2f}",
                      f"{c['dfa_states']}/{c['atoms']}/{c['groups']}/{c['edges']}"] for c in result["compile"]]))
    gpu_rows = []
    for s in result["step"]:
        if "denoise_step_cuda_ms" not in s:
            continue
        reduce = {k[len("reduce_cuda_"):-len("_ms")]: v for k, v in s.items()
                  if k.startswith("reduce_cuda_") and k.endswith("_ms") and not k.endswith("_min_ms")}
        order = sorted(reduce, key=lambda k: (k.split("_c")[0], int(k.split("_c")[1])))  # kernel, then chunk
        best = min(reduce, key=reduce.get) if reduce else "-"
        nan = float("nan")
        passes = ", ".join(f"{k} {s.get(f'marginals_cuda_{k}_ms', nan):.2f} / {s.get(f'draw_cuda_{k}_ms', nan):.2f}"
                           for k in ("torch", "triton") if f"marginals_cuda_{k}_ms" in s)
        gpu_rows.append([s["tokenizer"], str(s["n_tools"]), f"{s['denoise_step_cuda_ms']:.2f}",
                         f"{s.get('denoise_step_cuda_via_host_ms', nan):.2f}",
                         " / ".join(f"{s.get(f'split_{k}_ms', nan):.2f}"
                                    for k in ("reduce_atoms", "tokens_in_atoms", "log_marginals", "host")),
                         ", ".join(f"{k} {reduce[k]:.2f}" for k in order), best, passes])
    if gpu_rows:
        out.append(("denoise_step with the logits on the GPU (ms): vocabulary passes on the device vs the logits "
                    "copied to the host and the marginals back (the DP runs on the CPU in both); inside the "
                    "device step: atom reduction / token draw / marginals write / host (DP, group sums, atom "
                    "sampling); the atom reduction alone per kernel and chunk (torch; c1: a scatter per token) or "
                    "tile (triton) size; "
                    "the marginals write and a token draw at every position (inside its heaviest atom, past "
                    "its best token) alone per kernel",
                    ["tokenizer", "tools", "on the device", "via the host", "reduce / tokens / marginals / host",
                     "atom reduction", "fastest", "marginals / draw"], gpu_rows))
    return out


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each table, shared by the console and markdown output."""
    out = [] if result["config"].get("cuda_only") else host_tables(result)
    out += gpu_tables(result)
    if result["outlines"]:
        o_rows = []
        for o in result["outlines"]:
            if "error" in o:
                o_rows.append([o["tokenizer"], "-", o["error"], "", "", "", ""])
                continue
            idx = f"{o['outlines_index_s']:.3f}" if "outlines_index_s" in o else o.get("outlines_error", "?")
            o_rows.append([o["tokenizer"], o["tool"], str(o.get("regex_chars", "")), idx,
                           str(o.get("outlines_states", "")), f"{o['ours_compile_s']:.3f}", str(o["ours_dfa_states"])])
        vocab_s = {o["tokenizer"]: o.get("outlines_vocab_s", 0.0) for o in result["outlines"]}
        title = ("outlines-core Index(regex, Vocabulary) vs our compile_schema (json wire format, arguments only; "
                 "outlines Vocabulary build: " + ", ".join(f"{k} {v:.2f}s" for k, v in vocab_s.items()) + ")")
        out.append((title, ["tokenizer", "tool", "regex chars", "outlines Index s", "outlines states",
                            "ours compile s", "ours DFA states"], o_rows))
    return out


def print_tables(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=200)
        for title, header, rows in tables(result):
            t = Table(title=title, title_justify="left")
            for h in header:
                t.add_column(h, justify="right" if h not in ("tokenizer", "tool") else "left")
            for r in rows:
                t.add_row(*r)
            console.print(t)
    except ImportError:  # pragma: no cover - plain fallback
        for title, header, rows in tables(result):
            print(title)
            print(" | ".join(header))
            for r in rows:
                print(" | ".join(r))
            print()


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cuda_only = result["config"].get("cuda_only", False)
    lines = [
        "# Constraint benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs; numba threading layer "
        f"{m['numba_threading_layer']} ({m['numba_threads']} threads); Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, numpy {m['numpy']}"
        + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + "  ",
        f"Code: agentloop at {result['code']['commit']}"
        + (f" + uncommitted changes to {', '.join(result['code']['modified'])}" if result["code"]["modified"] else "")
        + "  ",
        f"Date: {result['date']}; total {result['total_s']:.0f} s; load average (1 min) at start "
        f"{result['load_average_start'][0]:.2f}, at end {result['load_average_end'][0]:.2f}"
        + ("" if cuda_only else " (2 CPUs shared with other work: treat single runs with care)"),
        "",
    ]
    if cuda_only:
        lines += ["GPU step ops only (`--cuda-only`): medians of {r} repeats after {w} warmup runs, random logits "
                  "(L={L}) on the GPU, {th} numba thread(s) for the host's share.".format(
                      r=result["config"]["repeats"], w=result["config"]["warmup"], L=result["config"]["length"],
                      th=result["config"]["threads"] or "default"), ""]
    else:
        lines += [
        "Times are medians of {r} repeats after {w} warmup runs (minimums in the JSON), with {th} torch/numba "
        "thread(s); logits are random (L={L}). The forward is one "
        "denoising step of a tiny random DiffusionGemma with the tokenizer's vocab (decoder over the canvas with "
        "self-conditioning logits, prompt of {P} tokens already in a DynamicCache); model size: {ms}.".format(
            r=result["config"]["repeats"], w=result["config"]["warmup"], L=result["config"]["length"],
            th=result["config"]["threads"] or "default",
            P=result["config"]["prompt"], ms=", ".join(f"{k}={v}" for k, v in result["config"]["model"].items())),
        "",
        ]
        for fw in result["forward"]:
            lines.append(f"- {fw['tokenizer']}: forward {fw['forward_ms']:.1f} ms ({fw['params'] / 1e6:.1f} M params, "
                         f"{fw['torch_threads']} torch threads)")
        lines.append("")
    for title, header, rows in tables(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (bpe-4k, 1 tool, L=64)")
    ap.add_argument("--tokenizers", help=f"comma-separated subset of {','.join(LOADERS)}")
    ap.add_argument("--tool-sets", help="comma-separated tool counts (default 1,5,20)")
    ap.add_argument("--length", type=int, help="canvas length L (default 256)")
    ap.add_argument("--repeats", type=int, help="timed repeats per measurement (median reported)")
    ap.add_argument("--outlines-tools", type=int, help="tools compared against outlines-core (0: skip)")
    ap.add_argument("--threading-layer", choices=["omp", "workqueue", "tbb"],
                    help="numba threading layer for the DP kernels (default: numba's choice, usually omp)")
    ap.add_argument("--threads", type=int, help="torch and numba threads (default 1; 0: library defaults)")
    ap.add_argument("--reuse-dfa-min-tools", type=int,
                    help="replay symbol DFAs across tokenizers for tool sets this large (0: never; default 20)")
    ap.add_argument("--cuda-only", action="store_true",
                    help="time only the GPU step ops (no CPU forward or host ops); writes constraint_cuda.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="directory for constraint.{json,md}")
    args = ap.parse_args(argv)

    cfg = Config.quick() if args.quick else Config()
    if args.tokenizers:
        cfg.tokenizers = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
        unknown = set(cfg.tokenizers) - set(LOADERS)
        if unknown:
            ap.error(f"unknown tokenizers {sorted(unknown)}; choose from {list(LOADERS)}")
    if args.tool_sets:
        cfg.tool_sets = [int(n) for n in args.tool_sets.split(",")]
    if args.length:
        cfg.length = args.length
    if args.repeats:
        cfg.repeats = args.repeats
    if args.outlines_tools is not None:
        cfg.outlines_tools = args.outlines_tools
    if args.threads is not None:
        cfg.threads = args.threads
    if args.reuse_dfa_min_tools is not None:
        cfg.reuse_dfa_min_tools = args.reuse_dfa_min_tools
    cfg.cuda_only = args.cuda_only
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "constraint_cuda" if cfg.cuda_only else "constraint"
    cfg.partial_out = args.out / f"{stem}.partial.json"
    if args.threading_layer:
        cfg.threading_layer = args.threading_layer
        numba.config.THREADING_LAYER = args.threading_layer  # before the first parallel kernel runs

    result = run(cfg)
    result["machine"] = machine()
    result["code"] = code_state()
    result["command"] = " ".join(["python", "bench/constraint.py", *(argv if argv is not None else sys.argv[1:])])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    cfg.partial_out.unlink(missing_ok=True)
    print_tables(result)
    (args.out / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {args.out / f'{stem}.json'} and {args.out / f'{stem}.md'}")
    return result


if __name__ == "__main__":
    main()
