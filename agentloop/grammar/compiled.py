"""CompiledGrammar: the object the engine and the runtime hold for one (language, tokenizer).

It owns the symbol DFA (the source of truth for what is valid), the token automaton
derived from it, and the canvas DP entry points that run once per denoising step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import numba
import numpy as np
import torch

from ..errors import GrammarInputError, NoValidCanvasError, ParseError
from ..numba_threads import row_parts
from . import canvas as dp
from . import device_passes, log_canvas, masks, pruning
from .canvas_layout import EdgeLayout, edge_layout
from .fsa import Dfa
from .token_automaton import TokenAutomaton
from .vocabulary import Vocabulary
from .wireformat import EOS


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: a tool name and its arguments (already valid for the schema)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedOutput:
    """What a tools canvas said: one or more calls, or a final text (never both)."""

    calls: list[ToolCall] = field(default_factory=list)
    text: str | None = None


@dataclass(frozen=True)
class StepOutput:
    """The constrained quantities of one denoising step (see ``denoise_step``)."""

    argmax: Any  #: Viterbi canvas: list[int] (or list of lists when batched)
    sample: Any  #: exact constrained sample, same shape as ``argmax``
    log_marginals: torch.Tensor  #: (L, V) or (B, L, V) float32 constrained log-probs
    entropy: torch.Tensor  #: (L,) or (B, L) float64 entropy of each position's marginal (nats)
    #: whether the passes ran on the pruned lattice (bool, or a list when batched); False
    #: where ``prune=False`` or where pruning gave up and they ran on the whole support
    pruned: Any = False


@dataclass(frozen=True)
class GrammarStats:
    dfa_states: int
    atoms: int
    groups: int
    edges: int
    vocab_size: int
    compile_seconds: float
    nbytes: int


def _check_logits_tensor(t: torch.Tensor) -> None:
    if t.is_complex() or t.dtype == torch.bool:
        raise GrammarInputError(f"logits must be real numbers, got a {t.dtype} tensor")
    if t.device.type == "meta":
        raise GrammarInputError("the logits are on the meta device, which holds no values")
    if t.layout != torch.strided:
        raise GrammarInputError(f"logits must be a dense tensor, got layout {t.layout}: pass logits.to_dense()")


def _as_numpy(logits: Any) -> np.ndarray:
    if getattr(logits, "ndim", None) == 0 or isinstance(logits, (int, float)):
        raise GrammarInputError(f"logits must be an (L, V) or (B, L, V) tensor or array, got a scalar {logits!r}"[:200])
    if isinstance(logits, torch.Tensor):
        t = logits.detach()
        _check_logits_tensor(t)
        if t.dtype != torch.float32:
            t = t.float()
        return np.ascontiguousarray(t.cpu().numpy())
    if logits is None or isinstance(logits, (str, bytes)):
        raise GrammarInputError(f"logits must be an (L, V) or (B, L, V) tensor or array, got {logits!r}"[:200])
    a = np.asarray(logits)
    if a.dtype.kind not in "fiu":
        raise GrammarInputError(f"logits must be real numbers, got an array of {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


#: The most memory ``allowed_tokens``' per-state masks keep (a (V,) bool array each: 4096
#: states of Gemma's 262k tokens held 1 GB), and the fewest states they keep.
ALLOWED_CACHE_BYTES = 64 << 20
_ALLOWED_CACHE_MIN = 64


#: Likewise for the supports a grammar keeps (one per canvas length and start state; an
#: engine's canvas reuses one at each step): 16 at most, and 16 MB each at 20 tools.
SUPPORT_CACHE_BYTES = 64 << 20
_SUPPORT_CACHE_MIN = 2


def _make_room(cache: dict[Any, Any], nbytes: int, budget: int, fewest: int, most: int | None = None) -> None:
    """Before a per-grammar cache takes an entry of ``nbytes``: drop its oldest where it
    holds as many as ``budget`` bytes of such entries allow (at least ``fewest``, at most
    ``most``)."""
    room = max(fewest, budget // max(nbytes, 1))
    if len(cache) >= (room if most is None else min(room, most)):
        _evict_oldest(cache)


def _evict_oldest(cache: dict[Any, Any]) -> None:
    """Drop a per-grammar cache's oldest entry. Threads share a grammar without a lock
    around its caches: another one may have dropped that entry, or be changing the dict,
    and the cache then simply stays a little fuller."""
    try:
        cache.pop(next(iter(cache)), None)
    except (RuntimeError, StopIteration):  # (changed during the iteration, or emptied)
        pass


def _check_generator(generator: Any) -> None:
    """The grammar draws its uniforms with torch on the host."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise GrammarInputError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                                f"{generator!r}: make one with torch.Generator().manual_seed(seed)"[:300])
    if generator.device.type != "cpu":
        raise GrammarInputError(f"generator is on {generator.device}, but the grammar draws its uniforms on the "
                                "host: pass a CPU torch.Generator")


@dataclass(frozen=True)
class _Scores:
    """One pass over a step's logits: per-row atom statistics on the host (numpy)."""

    flat: Any  # (B * L, V) the logits: numpy, or a float32 tensor on its device
    rowmax: np.ndarray  # (N,) f64 the reference each row's sums are taken from
    asum: np.ndarray  # (N, K) f64 sum of exp(x - rowmax) per atom
    asumx: np.ndarray  # (N, K) f64 the same weighted by (x - rowmax), for entropies
    amax: np.ndarray  # (N, K) f32 best logit per atom
    aarg: np.ndarray  # (N, K) i32 its token
    #: per canvas: (L, N) f64 sums per node of the group plan (the G groups, then its
    #: blocks), in Fortran order (``_group_values_by_canvas``); empty where the scan took no sums
    gsum: list[np.ndarray]
    n_groups: int  # G
    block_sums: np.ndarray  # (N, blocks) f32 host pass: sums of exp(x - amax) per block of each atom's tokens
    rowmax_dev: torch.Tensor | None  # (N,) rowmax on the logits' device (device passes), else None
    #: ``log_canvas.log_atom_stats``, taken for all rows when a canvas first needs them
    _log_stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    #: ``log_canvas.log_sums_by_group`` of those, likewise (``CompiledGrammar._log_sums``)
    _log_gsum: list[np.ndarray] = field(default_factory=list)

    def canvas_gsum(self, rows: slice) -> np.ndarray:
        """gsum (L, G) of the canvas whose rows of the batch are ``rows`` (canvases of no
        position: the first's, (0, G) as every one's): the groups' columns of its node
        sums, which ``canvas_node_sums`` gives whole."""
        return self.canvas_node_sums(rows)[:, :self.n_groups]

    def canvas_node_sums(self, rows: slice) -> np.ndarray:
        """The node sums (L, N) of the canvas whose rows of the batch are ``rows``, as the
        atom draw walks them (``canvas._draw_edge_and_atom``)."""
        L = max(rows.stop - rows.start, 1)
        assert rows.start % L == 0, rows  # (one canvas's rows, as every op slices them)
        return self.gsum[rows.start // L]

    def log_stats(self, atoms: dp.SortedAtoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(log sum of exp(x - rowmax), mean of x - amax, log sum of exp(x - amax)) per atom
        (N, K) each, exact where ``asum`` underflows (see ``log_canvas.log_atom_stats``).
        Where no atom's sum left float64's normal range the scan's sums give them, without
        a second pass over the logits (a sure model the grammar overrules: its canvases
        weigh too little for the fast sweep, not its atoms); the mean then needs the
        scan's entropy sums (nan without them: only entropies read it)."""
        if not self._log_stats and self.asum.shape == self.amax.shape and self.asum.shape[1] > 1 \
                and not dp.below_normal(self.asum, self.aarg).any():  # (one atom: the sums' placeholders alike)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_sum = np.log(self.asum)  # (N, K) (-inf for an atom without a usable logit)
                gap = self.amax.astype(np.float64) - self.rowmax[:, None]  # (N, K) each atom's best from its row's
                log_inside = np.where(self.aarg >= 0, log_sum - gap, -np.inf)
                mean_gap = (self.asumx / self.asum - gap if self.asumx.shape == self.asum.shape
                            else np.full(self.asum.shape, np.nan))
            self._log_stats.append((log_sum, np.where(self.aarg >= 0, mean_gap, 0.0), log_inside))
        if not self._log_stats:
            if isinstance(self.flat, np.ndarray):
                stats = log_canvas.log_atom_stats_host(self.flat, atoms, self.amax, self.rowmax)
            else:
                stats = log_canvas.log_atom_stats(self.flat, atoms.atom_of, self.amax, self.rowmax)
            self._log_stats.append(stats)
        return self._log_stats[0]

    def log_underflow(self, rows: slice) -> float:
        """The log of a bound on the probability, with each row's tokens normalised over
        the allowed ones, of the token sequences through an atom whose sum fell below
        float64's smallest normal in these rows: each such atom weighs less than that
        number at its row (-inf where none did)."""
        asum = self.asum[rows]
        under = dp.below_normal(asum, self.aarg[rows])  # (L,)
        if not under.any():
            return -math.inf
        norm = asum.sum(axis=1)  # (L,) at least 1 where a row has an allowed finite logit
        if not (norm > 0.0).all():  # (no valid canvas has mass: nothing to bound)
            return math.inf
        return math.log(float((under * dp.NORMAL_MIN / norm).sum()))


def _group_values_by_canvas(reduce: Callable[[np.ndarray, dp.GroupPlan], np.ndarray], values: np.ndarray,
                           plan: dp.GroupPlan, B: int) -> list[np.ndarray]:
    """Each of B canvases' group values (L, G), reduced (``dp.group_max``; or its node
    sums (L, N), ``dp.group_node_sums``) from its rows of ``values`` (B * L, K) alone:
    each comes out in Fortran order, as a lone canvas's does. The rows of one (B * L, G) Fortran array are
    strided (numba's 'A' layout), and every kernel that read them compiled a second time
    for batches: 17 signatures, 85 -> 62 s of ``agentloop precompile`` on 2 cores
    (bench/results/precompile_ab_batch_layout.md)."""
    L = values.shape[0] // max(B, 1)
    return [reduce(values[b * L:(b + 1) * L], plan) for b in range(B)]


class _Passes(NamedTuple):
    """What the DP over one canvas gave (see ``CompiledGrammar._canvas_passes``)."""

    beta: np.ndarray | None  # backward messages (dense: (L + 1, S) by row; live lists: one per live state)
    beta_totals: np.ndarray | None  # (L + 1,) each backward row's total
    F: np.ndarray | None  # (L, K) atom factors
    path: list[int] | None  # the Viterbi canvas
    #: False where the sums left float64's range (a pass without mass, or forward and
    #: backward masses that disagree): beta and F are then to be redone in log space
    #: (``CompiledGrammar._log_space``); path may be None then too.
    in_range: bool


#: A canvas whose atom sums already left float64's range: straight to log space.
_OUT_OF_RANGE = _Passes(None, None, None, None, in_range=False)


class _LogCanvas(NamedTuple):
    """What the passes in log space gave for one canvas (``CompiledGrammar._log_space``)."""

    log_f: np.ndarray  # (L, K) log F, with factors asked (else (0, 0))
    atoms: np.ndarray  # (L,) the sampled atoms, with uniforms given (else (0,))
    log_asum: np.ndarray  # (L, K) the atoms' log sums the passes weighed
    log_inside: np.ndarray  # (L, K) each atom's log sum from its own best token
    #: None: log_asum and log F are taken from each row's best (rowmax), and a token's
    #: log-marginal is x - rowmax + log F. Else, where masks stood in (``masks``),
    #: (L, K) each atom's stand-in (its best logit, or a mask's stand-in) less its row's
    #: largest: a token's log-marginal is (x - amax) + log F + frame.
    frame: np.ndarray | None
    #: whether the passes ran over kept cells (pruning's), not the whole support
    kept: bool = False


_Op = TypeVar("_Op", bound=Callable[..., Any])


def _holding_messages(op: _Op) -> _Op:
    """Run ``op`` with a set of the dense passes' message buffers taken
    (``canvas.MessageBuffers``): reused from an earlier op, given back after."""

    @functools.wraps(op)
    def run(*args: Any, **kwargs: Any) -> Any:
        with dp.MESSAGES.taken():
            return op(*args, **kwargs)

    return run  # type: ignore[return-value]


class CompiledGrammar:
    """A language over token ids with exact canvas inference.

    Build with :func:`agentloop.grammar.compile_schema` or
    :func:`agentloop.grammar.compile_tools`. ``kind`` is ``"value"`` or ``"tools"``.
    """

    def __init__(self, dfa: Dfa, automaton: TokenAutomaton, vocab: Vocabulary, kind: str,
                 tools: Sequence[Any] = (), compile_seconds: float = 0.0) -> None:
        self.dfa = dfa
        self.automaton = automaton
        self.vocab = vocab
        self.wire_format = vocab.wire_format
        self.kind = kind
        self.tools = list(tools)
        self.compile_seconds = compile_seconds
        ta = automaton
        self._final_complete = np.ascontiguousarray(ta.accept.astype(np.bool_))
        self._final_any = np.ones(ta.n_states, np.bool_)
        self._support_cache: dict[tuple[int, int, bool, str], dp.Support] = {}
        self._fewest_to_finish: dict[bool, np.ndarray | None] = {}  # partial -> pruning.fewest_to_finish
        self._allowed_cache: dict[int, np.ndarray] = {}
        self._atom_layouts: dict[tuple[int, str], device_passes.AtomLayout] = {}  # (V, device) -> its layout
        self._host_atoms: dict[int, dp.SortedAtoms] = {}  # V -> each atom's tokens (the host pass)

    # ---- states ------------------------------------------------------------------------
    @property
    def start_state(self) -> int:
        return self.automaton.start

    def state_after(self, ids: Sequence[int], state: int | None = None) -> int:
        """Automaton state after ``ids`` (carry it into the next canvas); -1 if invalid
        (from ``state`` -1 too, so that calls chain)."""
        if state is not None and not isinstance(state, bool) and state == -1:
            return -1
        q = self._state(state)
        for t in self._token_ids(ids):
            q = self.automaton.step(q, t)
            if q < 0:
                return -1
        return q

    def is_complete(self, state: int) -> bool:
        """True once the stop token has been written (the rest of a canvas is padding)."""
        return state != -1 and bool(self.automaton.accept[self._state(state)])

    @property
    def stats(self) -> GrammarStats:
        ta = self.automaton
        return GrammarStats(self.dfa.n_states, ta.n_atoms, ta.n_groups, ta.n_edges, self.vocab.size,
                            self.compile_seconds, ta.nbytes())

    # ---- membership --------------------------------------------------------------------
    def accepts(self, ids: Sequence[int], state: int | None = None) -> bool:
        """Whether ``ids`` (content, stop token included, padding optional) is in the language."""
        ids = self._token_ids(ids)
        try:
            syms = self.vocab.symbols(ids)
        except (GrammarInputError, ParseError):  # (an id outside the vocabulary, or one no canvas holds)
            return False
        if state is not None:
            # continue from a token-automaton state: walk tokens instead
            q = self.state_after(ids, state)
            return q >= 0 and bool(self.automaton.accept[q])
        return self.dfa.accepts(syms)

    def accepts_json(self, value: Any) -> bool:
        """Whether the canonical spelling of ``value`` is accepted.

        For a value grammar ``value`` is any JSON value; for a tools grammar it is a list of
        ``{"name": ..., "arguments": {...}}`` calls (or ``ToolCall``s), a ``str`` final
        text, or what ``parse`` returns (a ``ParsedOutput``). Object keys may come in any
        order in ``value`` (up to 10 keys an object; a larger one in its own order, as
        ``parse`` returns it): the grammar's own order (schema order) is used. A number is
        accepted in any of its spellings (``WireFormat.number_spellings``). Past 2**53 a
        float's spellings read back as it as a double, not all exactly: 1e30's shortest
        decimal, 10**30 exactly, is another number than the double's 10**30 + 19884624838656.
        So under ``"maximum": 10**30 + 7`` the float 1e30 is accepted (its decimal is within
        the bound under both readings, as every number the grammar writes is), where
        jsonschema, comparing the double exactly, finds it too large.
        """
        wf = self.wire_format
        end = [wf.symbol(EOS)]
        if self.kind == "value":
            return any(self._run_end(q, end) for q in self._walk_value(value, {self.dfa.start}))
        if isinstance(value, ParsedOutput):
            value = value.text if value.text is not None else value.calls
        if isinstance(value, str):
            text = wf.text
            q = self.dfa.run(wf.lit("open", "text"))
            if q < 0:
                return False
            if text.get("body", "raw") == "string":
                body = wf.spell_value(value)
            else:
                body = list(value.encode("utf-8"))
            q = self.dfa.run(body + wf.lit("close", "text") + wf.lit("end", "text"), q)
            return q >= 0 and bool(self.dfa.accept[q])
        if not isinstance(value, list) or not value:
            return False
        states = {self.dfa.run(wf.lit("open", "calls"))} - {-1}
        for i, call in enumerate(value):
            if i:
                states = {self.dfa.run(wf.lit("separator", "calls"), q) for q in states} - {-1}
            states = self._walk_call(call, states)
        states = {self.dfa.run(wf.lit("close", "calls") + wf.lit("end", "calls"), q) for q in states} - {-1}
        return any(self.dfa.accept[q] for q in states)

    def _run_end(self, q: int, end: list[int]) -> bool:
        q = self.dfa.run(end, q)
        return q >= 0 and bool(self.dfa.accept[q])

    def _walk_call(self, call: Any, states: set[int]) -> set[int]:
        if isinstance(call, ToolCall):
            call = {"name": call.name, "arguments": call.arguments}
        if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
            return set()
        out: set[int] = set()
        for part in self.wire_format.template(self.wire_format.calls["call"]):
            if part == "name":
                name = list(str(call["name"]).encode())
                states = {self.dfa.run(name, q) for q in states} - {-1}
            elif part == "arguments":
                states = self._walk_value(call["arguments"], states)
            else:
                states = {self.dfa.run(part, q) for q in states} - {-1}  # type: ignore[arg-type]
            if not states:
                return out
        return states

    #: Objects of at most this many keys are walked in every key order (2**n sets of keys
    #: used); larger ones in their own order only, as ``parse`` hands them back (every
    #: order: minutes at 20 keys).
    _ALL_KEY_ORDERS_UP_TO = 10

    def _walk_value(self, v: Any, states: set[int]) -> set[int]:
        """States after spelling ``v`` from any of ``states``, over every key order (an
        object of more than ``_ALL_KEY_ORDERS_UP_TO`` keys: in its own order)."""
        wf = self.wire_format
        run = self.dfa.run
        if not states:
            return states
        if isinstance(v, dict):
            msep = wf.lit("member_separator")
            frontier = {(q, frozenset()) for q in (run(wf.lit("object_open"), q) for q in states) if q >= 0}
            keys = list(v)
            try:
                spelled = {k: wf.key_symbols(k) for k in keys}
            except Exception:
                return set()
            walked: dict[tuple[str, int], set[int]] = {}  # (key, state after it) -> states after its value
            for i in range(len(keys)):
                nxt: set[tuple[int, frozenset[str]]] = set()
                for q, used in frontier:
                    for k in (keys if len(keys) <= self._ALL_KEY_ORDERS_UP_TO else keys[i:i + 1]):
                        if k in used:
                            continue
                        q1 = run((msep if used else []) + spelled[k], q)
                        if q1 < 0:
                            continue
                        if (k, q1) not in walked:
                            walked[k, q1] = self._walk_value(v[k], {q1})
                        for q2 in walked[k, q1]:
                            nxt.add((q2, used | {k}))
                frontier = nxt
                if not frontier:
                    return set()
            close = wf.lit("object_close")
            return {q2 for q, _ in frontier if (q2 := run(close, q)) >= 0}
        if isinstance(v, list):
            cur = {q for q in (run(wf.lit("array_open"), q) for q in states) if q >= 0}
            for i, item in enumerate(v):
                if i:
                    cur = {q for q in (run(wf.lit("item_separator"), q) for q in cur) if q >= 0}
                cur = self._walk_value(item, cur)
            return {q for q in (run(wf.lit("array_close"), q) for q in cur) if q >= 0}
        try:
            # (a number has more than one spelling: which one the grammar writes depends
            # on the schema, 1e-07 unbounded, 0.0000001 under a bound)
            spellings = wf.number_spellings(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
                else [wf.spell_value(v)]
        except (TypeError, ValueError):
            return set()
        return {q1 for syms in spellings for q1 in (run(syms, q) for q in states) if q1 >= 0}

    # ---- parsing -----------------------------------------------------------------------
    def parse(self, ids: Sequence[int]) -> Any:
        """Decode complete canvas content: a JSON value (value grammar) or a ParsedOutput."""
        tokens = self._token_ids(ids)
        syms = self.vocab.symbols(tokens)
        q = self.dfa.start
        i = 0
        for n, t in enumerate(tokens):  # token by token, to name the token where the content goes wrong
            for s in self.vocab.token_symbols[t]:
                before, q = q, self.dfa.step(q, s)
                if q < 0:
                    raise ParseError(f"token {n} (id {t}, {self._spell(self.vocab.token_symbols[t])!r}) is not "
                                     f"allowed after {self._spell(syms[max(0, i - 60):i])!r}: at "
                                     f"{self._describe(s)} the grammar expects {self._expected(before)}")
                i += 1
        if not self.dfa.accept[q]:
            raise ParseError(f"the content is incomplete: it ends with {self._spell(syms[-60:])!r}, where the "
                             f"grammar expects {self._expected(q)} (it ends with its stop token)")
        if self.kind == "value":
            value, _ = self.wire_format.parse_value(syms)
            return value
        return self._parse_tools(syms)

    def _describe(self, s: int) -> str:
        return repr(chr(s)) if s < 128 else (f"byte 0x{s:02x}" if s < 256 else self.wire_format.symbol_name(s))

    def _spell(self, syms: Sequence[int]) -> str:
        """Symbols as text: bytes decoded (a cut character replaced), special symbols by name."""
        return self.wire_format.symbols_text(list(syms))

    def _expected(self, q: int, most: int = 6) -> str:
        """The symbols the automaton takes from state ``q``: a few of its classes, named."""
        classes = [np.flatnonzero(self.dfa.sym_class == c) for c in np.flatnonzero(self.dfa.trans[q] >= 0)]
        if not classes:
            return "nothing more"
        named = []
        for members in sorted(classes, key=lambda m: int(m[0]))[:most]:
            lo, hi = int(members[0]), int(members[-1])
            if members.size == 1:
                named.append(self._describe(lo))
            elif hi - lo + 1 == members.size:
                named.append(f"{self._describe(lo)}..{self._describe(hi)}")
            else:
                named.append(f"one of {members.size} symbols such as {self._describe(lo)}")
        return " or ".join(named) + (" or more" if len(classes) > most else "")

    def _parse_tools(self, syms: list[int]) -> ParsedOutput:
        wf = self.wire_format
        tpl = wf.template(wf.calls["call"])
        head = wf.lit("open", "calls") + (tpl[0] if tpl and isinstance(tpl[0], list) else [])
        if head and syms[: len(head)] == head:
            return ParsedOutput(calls=self._parse_calls(syms))
        pos = len(wf.lit("open", "text"))
        if wf.text.get("body", "raw") == "string":
            value, _ = wf.parse_value(syms, pos)
            return ParsedOutput(text=value)
        end = pos
        while end < len(syms) and syms[end] < 256:  # raw text is bytes up to the first special
            end += 1
        close = wf.lit("close", "text")
        if close and all(c < 256 for c in close):
            end -= len(close)
        try:
            return ParsedOutput(text=bytes(syms[pos:end]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ParseError(f"final text is not valid UTF-8: {e}") from None

    def _parse_calls(self, syms: list[int]) -> list[ToolCall]:
        wf = self.wire_format
        tpl = wf.template(wf.calls["call"])
        pos = len(wf.lit("open", "calls"))
        sep = wf.lit("separator", "calls")
        names = sorted((t.name for t in self.tools), key=len, reverse=True)
        calls: list[ToolCall] = []
        while True:
            name = ""
            args: Any = None
            for part in tpl:
                if part == "name":
                    for n in names:
                        if syms[pos : pos + len(n.encode())] == list(n.encode()):
                            rest = tpl[tpl.index("name") + 1 :]
                            nxt = rest[0] if rest else None
                            after = pos + len(n.encode())
                            if nxt is None or isinstance(nxt, str) or syms[after : after + len(nxt)] == nxt:
                                name = n
                                pos = after
                                break
                    else:
                        raise ParseError(f"unknown tool name at symbol {pos}")
                elif part == "arguments":
                    args, pos = wf.parse_value(syms, pos)
                else:
                    if syms[pos : pos + len(part)] != part:  # type: ignore[arg-type]
                        raise ParseError(f"malformed call at symbol {pos}")
                    pos += len(part)  # type: ignore[arg-type]
            calls.append(ToolCall(name, args))
            if sep and syms[pos : pos + len(sep)] == sep:
                pos += len(sep)
                continue
            if not sep and syms[pos : pos + len(tpl[0])] == tpl[0] and isinstance(tpl[0], list) and tpl[0]:
                continue
            return calls

    # ---- canvas inference --------------------------------------------------------------
    def _prepare(self, logits: Any) -> tuple[Any, bool]:
        """(B, L, V) logits as numpy on the host, or, on a CUDA device, as a float32 tensor
        left there (see ``device_passes``; its sums are float64, which MPS lacks), and
        whether the call was batched."""
        if isinstance(logits, torch.Tensor) and (logits.device.type == "cuda" or self._device_passes_on_cpu):
            _check_logits_tensor(logits)
            x: Any = logits.detach().float()
        else:
            x = _as_numpy(logits)
        batched = x.ndim == 3
        if x.ndim not in (2, 3):
            raise GrammarInputError(f"logits must be (L, V) or (B, L, V), got shape {tuple(x.shape)}")
        V = x.shape[-1]
        if V < self.vocab.size:
            raise GrammarInputError(
                f"logits have {V} columns but the grammar's tokenizer has {self.vocab.size} tokens; "
                "was the grammar compiled for this model's tokenizer?"
            )
        return (x if batched else x[None]), batched

    #: Run the vocabulary passes in torch for CPU tensors too (tests of the device path).
    _device_passes_on_cpu = False
    #: Which canvas passes run: "dense", "live" (lists of live states) or "auto", chosen
    #: by the automaton's size and how much of it lives (see ``canvas.dense_pays``;
    #: tests set it to run both).
    _canvas_pass_kind = "auto"

    def _atom_layout(self, V: int, device: torch.device) -> device_passes.AtomLayout:
        key = (V, str(device))
        layout = self._atom_layouts.get(key)
        if layout is None:
            layout = device_passes.atom_layout(self._atom_of(V), self.automaton.n_atoms, device)
            self._atom_layouts[key] = layout
        return layout

    def _sorted_atoms(self, V: int) -> dp.SortedAtoms:
        hit = self._host_atoms.get(V)
        if hit is None:
            hit = self._host_atoms[V] = dp.sorted_atoms(self._atom_of(V), self.automaton.n_atoms)
        return hit

    def _atom_of(self, V: int) -> np.ndarray:
        a = self.automaton.atom_of_token
        if V == a.shape[0]:
            return a
        out = np.full(V, -1, np.int32)  # model vocab padded past the tokenizer: never allowed
        out[: a.shape[0]] = a
        return out

    def _state(self, state: Any) -> int:
        """One automaton state from a caller (None: the start state), checked."""
        if state is None:
            return self.start_state
        if isinstance(state, (torch.Tensor, np.ndarray)) and state.ndim == 0:
            state = state.item()
        if isinstance(state, bool) or not isinstance(state, (int, np.integer)):
            raise GrammarInputError(f"a state is an int (from start_state or state_after), got {state!r}")
        s = int(state)
        if s == -1:
            raise GrammarInputError("state -1 is state_after's answer for ids that are not a valid prefix: "
                                    "there is no state to continue from")
        if not 0 <= s < self.automaton.n_states:
            raise GrammarInputError(f"state {s} does not exist (the automaton has {self.automaton.n_states})")
        return s

    def _states(self, state: Any, B: int) -> list[int]:
        """A start state per canvas of a batch of B: one state for all, or one each."""
        if state is None or isinstance(state, (int, np.integer)) or \
                (isinstance(state, (torch.Tensor, np.ndarray)) and state.ndim == 0):
            return [self._state(state)] * B
        if isinstance(state, (torch.Tensor, np.ndarray)):
            state = state.tolist()
        if not isinstance(state, Sequence) or isinstance(state, (str, bytes)):
            raise GrammarInputError(f"state must be an int or one int per canvas, got {state!r}")
        states = [self._state(s) for s in state]
        if len(states) != B:
            raise GrammarInputError(f"{len(states)} start states for a batch of {B}")
        return states

    @staticmethod
    def _token_ids(ids: Any) -> list[int]:
        """A flat list of token ids from a list, numpy array or tensor, checked."""
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise GrammarInputError(f"token ids must be a sequence of ints, got {type(ids).__name__} {ids!r}"[:200])
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise GrammarInputError(f"token ids must be one flat sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for n, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise GrammarInputError(f"token ids must be ints: item {n} is {i!r}")
            out.append(int(i))
        return out

    def _final(self, partial: bool) -> np.ndarray:
        return self._final_any if partial else self._final_complete

    @staticmethod
    def _check_length(length: Any) -> None:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise GrammarInputError(f"a canvas length is an int >= 0, got {length!r}")  # (3.0 == 3 as a key)

    @staticmethod
    def _check_partial(partial: Any) -> None:
        # (before the caches keyed by it: 1 == True would find True's entry)
        if not isinstance(partial, (bool, np.bool_)):
            raise GrammarInputError(f"partial must be True or False, got {partial!r}")

    @_holding_messages
    def viterbi(self, logits: Any, state: int | Sequence[int] | None = None, partial: bool = False,
                prune: bool = True) -> Any:
        """Most probable valid canvas. logits (L, V) -> list[int]; (B, L, V) -> list[list[int]].

        ``partial=True`` lets the canvas end before the stop token (the call continues in
        the next canvas from ``state_after``); otherwise it must contain the stop token.
        ``prune`` skips the lattice cells the best canvas cannot pass (see
        ``grammar.pruning``; the same canvas either way). A nan logit counts as -inf here,
        as in ``max()`` (``sample``, ``marginals`` and ``denoise_step``, whose sums it
        would poison, refuse it with ``GrammarInputError``). A +inf logit at a token the
        grammar allows is refused with ``GrammarInputError``, as by the other ops: every
        canvas through it would score +inf, whatever its other logits.
        """
        xs, batched = self._prepare(logits)
        B, L, V = xs.shape
        sc = self._scores(xs, want_sum=False, want_x=False)
        gmax, amax, moved = self._viterbi_scores(sc, B)
        prune = prune and not moved
        out = []
        b = 0
        try:
            for b, s0 in enumerate(self._states(state, B)):
                sl = slice(b * L, (b + 1) * L)
                sup, _, _ = self._step_support(sc, sl, s0, partial, prune, sums=False, gmax=gmax[b])
                path = self._canvas_passes(sup, s0, partial, gmax=gmax[b], best=(amax[sl], sc.aarg[sl]),
                                           forced=self._forced_by_mask(sc, sl)).path
                assert path is not None
                out.append(path)
        except NoValidCanvasError as e:  # (which canvas of a batch has none)
            raise self._in_batch(e, b, B) from None
        return out if batched else out[0]

    def _viterbi_scores(self, sc: "_Scores", B: int) -> tuple[list[np.ndarray], np.ndarray, bool]:
        """(gmax (L, G) for each of the B canvases, amax (N, K)) for the Viterbi pass, and
        whether a row was moved: a row whose allowed logits all lie near one huge value
        (|x| >= 2**24, within a factor 2 of each other: a row masked with float32's
        lowest) is taken from its best, exactly in float32 (Sterbenz). A row's constant
        does not change the argmax, but added into the canvases' scores in float64 it
        drowned their O(1) differences elsewhere (the Viterbi canvas ignored every other
        row). Pruning's bounds are taken from the logits as they are, so a call with a
        moved row runs the whole lattice."""
        # (a moved row's shift is exact on each of its atoms, so its groups' maxima move alike)
        amax = masks.effective_maxima(sc.amax, sc.rowmax)  # (rowmax: each row's best finite allowed logit)
        return _group_values_by_canvas(dp.group_max, amax, self._group_plan, B), amax, amax is not sc.amax

    def _canvas_passes(self, sup: dp.Support, s0: int, partial: bool, *, gsum: np.ndarray | None = None,
                       factors: bool = False, gmax: np.ndarray | None = None,
                       best: tuple[np.ndarray, np.ndarray] | None = None, forced: bool = False,
                       stand_ins: bool = True) -> "_Passes":
        """The DP over one canvas: beta when ``gsum`` (L, G) is given, the atom factors
        F (L, K) too with ``factors``, the Viterbi canvas when ``gmax`` (L, G) and
        ``best`` (each atom's best logit and token, (L, K)) are.

        On dense messages the passes that do not depend on each other (Viterbi, alpha,
        beta) run as tasks on numba's threads, then the factors from alpha and beta, a
        block of positions per thread; on one thread, beta, then alpha, the factors and
        the Viterbi pass in one sweep (the same numbers). Over live-state lists beta comes
        first, then one forward sweep for the factors and the Viterbi pass together (it
        shares the edges' loads), each position's states shared by the threads.

        Where the sums leave float64's range (a pass without mass where the support says
        there are valid canvases, or forward and backward masses that disagree), the
        result says so (``in_range``) rather than raising: the caller redoes the canvas
        in log space (``_log_space``). Where the Viterbi canvas passes a huge finite logit
        (a mask, see ``masks``), whose sum with the others kept none of their
        differences, or where a row holds a positive mask (``forced``: a canvas through
        it and a larger negative one counts them as cancelling, as the marginals do,
        and its face-value score loses to canvases without masks), the Viterbi pass is
        redone with the masks' stand-ins (with ``stand_ins``:
        ``_viterbi_with_stand_ins``)."""
        ta = self.automaton
        L = (gsum if gsum is not None else gmax).shape[0]  # type: ignore[union-attr]
        none2 = np.zeros((0, 0), np.float64)
        beta = F = trace = None
        best_end, ok = -1, True
        alpha_totals, beta_totals = np.ones(L + 1), np.ones(L + 1)  # (L + 1,) each: the rows' totals
        if sup.dense:
            lay = self._layout
            edges = (sup.live, lay.src, lay.dst, lay.group, lay.runs, sup.clip, lay.fans, lay.in_row, lay.in_other,
                     lay.in_group, lay.rank[s0])

            def messages(p: int, wanted: bool = True) -> np.ndarray:
                return dp.MESSAGES.get(p, L + 1, ta.n_states) if wanted else np.empty((0, ta.n_states))

            if gmax is not None and gsum is None:  # viterbi alone
                trace = messages(dp.VITERBI)
                best_end, ok = dp._viterbi_into(trace, gmax, *edges, lay.rank)
            elif gmax is None and not factors:  # beta alone (sample)
                beta = messages(dp.BETA)
                ok = dp._backward_into(beta, gsum, *edges[:7], beta_totals)
            elif factors and numba.get_num_threads() == 1:
                # one thread: beta, then the factors taken in the forward sweep, and the
                # Viterbi pass in it too where asked (no thread would run the passes side
                # by side, or the factors' positions)
                beta = messages(dp.BETA)
                ok = dp._backward_into(beta, gsum, *edges[:7], beta_totals)
                if ok and gmax is not None:
                    trace = messages(dp.VITERBI)
                    F, best_end, ok = dp._alpha_factors_viterbi(beta, gsum, gmax, trace, *edges, lay.rank,
                                                                ta.atom_groups, ta.atom_group_offsets, beta_totals,
                                                                alpha_totals)
                elif ok:
                    F, ok = dp._alpha_factors(beta, gsum, *edges, ta.atom_groups, ta.atom_group_offsets,
                                              beta_totals, alpha_totals)
            else:
                threads = numba.get_num_threads()
                passes = tuple(p for p, wanted in ((dp.VITERBI, gmax is not None), (dp.ALPHA, factors),
                                                   (dp.BETA, True)) if wanted)
                trace, alpha, beta = (messages(p, p in passes) for p in (dp.VITERBI, dp.ALPHA, dp.BETA))
                status = dp._dense_passes(gsum, none2 if gmax is None else gmax, *edges, lay.rank,
                                          dp.dense_tasks(passes, threads), trace, alpha, beta, alpha_totals,
                                          beta_totals)
                best_end, ok = int(status[0]), bool(status[1:].all())
                if ok and factors:
                    F, ok = dp._factors(alpha, beta, gsum, *edges[1:10], ta.atom_groups, ta.atom_group_offsets,
                                        alpha_totals, beta_totals, row_parts(L))
        else:
            if gsum is not None:
                beta, ok = dp.live_kernel(dp._BACKWARD_LIVE, sup.offsets)(
                    gsum, sup.offsets, sup.states, *self._out_edges, ta.n_states, beta_totals)
            if ok and (factors or gmax is not None):
                kernel = dp.live_kernel(dp._FORWARD_LIVE_MAX if not factors else dp._FORWARD_LIVE_SUM if gmax is None
                                        else dp._FORWARD_LIVE_BOTH, sup.offsets)
                # trace: here a backpointer per live state
                F, trace, best_end, ok = kernel(
                    gsum if factors else none2, none2 if gmax is None else gmax, sup.offsets, sup.states,
                    beta if factors else np.zeros(0, np.float64), *self._in_edges, ta.group_atoms, ta.group_offsets,
                    ta.n_atoms, ta.n_states, alpha_totals)
        if not ok:
            if gsum is None:  # Viterbi scores are logs: no range to leave; the support has canvases, the logits none
                raise NoValidCanvasError(self._no_finite_canvas_message(L, s0))
            return _OUT_OF_RANGE
        path = None
        if gmax is not None:
            assert best is not None and trace is not None
            path, far = self._viterbi_path(sup, trace, best_end, gmax, best)
            if (far >= masks.MASK_LOGIT or forced) and stand_ins:
                path = self._viterbi_with_stand_ins(L, s0, partial, best)
        if factors:  # the total weight of the valid canvases, once from each end
            beta_start = beta[0, self._layout.rank[s0]] if sup.dense else beta[sup.offsets[0]]
            gap = dp.log_mass_forward(alpha_totals) - dp.log_mass_backward(beta_start, beta_totals, sup.dense)
            if not abs(gap) <= dp.MASS_TOLERANCE:
                return _Passes(None, None, None, path, in_range=False)
        return _Passes(beta, beta_totals, F if factors else None, path, in_range=True)

    @staticmethod
    def _forced_by_mask(sc: "_Scores", sl: slice) -> bool:
        """Whether a row of ``sl`` holds a positive mask (its best logit is one: one
        compare a row)."""
        return bool(sc.rowmax[sl].max(initial=-np.inf) >= masks.MASK_LOGIT)

    def _viterbi_with_stand_ins(self, L: int, s0: int, partial: bool, best: tuple[np.ndarray, np.ndarray]
                                ) -> list[int]:
        """The Viterbi canvas with each mask among the atoms' best logits ``best`` (L, K)
        replaced by its stand-in (``masks``), over the cells pruning keeps for it (the same
        canvas as over the whole support) where it keeps few."""
        amax = masks.stand_ins(best[0]).astype(np.float32)  # (L, K) (whole numbers: exact)
        gmax = dp.group_max(amax, self._group_plan)
        to_finish = self._to_finish(partial)
        kept = None if to_finish is None else pruning.probable_support(
            to_finish, s0, self._out_edges, amax.max(axis=1).astype(np.float64), gmax=gmax)
        sup = kept if kept is not None else self._support(L, s0, partial)
        path = self._canvas_passes(sup, s0, partial, gmax=gmax, best=(amax, best[1]), stand_ins=False).path
        assert path is not None
        return path

    def _viterbi_path(self, sup: dp.Support, trace: np.ndarray, best_end: int, gmax: np.ndarray,
                      best: tuple[np.ndarray, np.ndarray]) -> tuple[list[int], float]:
        """The Viterbi canvas from the max pass's record (``trace``: scores by row on
        dense messages, backpointers over live lists) and each atom's best token, and the
        largest magnitude of its logits."""
        ta = self.automaton
        if sup.dense:
            groups = dp._trace_back(trace, best_end, gmax, self._layout.state, self._layout.rank, *self._in_edges)
        else:
            _, in_src, in_group = self._in_edges
            groups = dp._trace_back_live(trace, best_end, sup.offsets, sup.states, in_src, in_group)
        tokens, far = dp.group_best_tokens(groups, gmax, *best, ta.group_atoms, ta.group_offsets)
        return tokens.tolist(), far

    @staticmethod
    def _no_finite_canvas_message(L: int, s0: int) -> str:
        return (f"no canvas of {L} positions from state {s0} has a finite score: every valid one passes a token "
                "whose logit is -inf (or nan)")

    @staticmethod
    def _in_batch(e: NoValidCanvasError, b: int, B: int) -> NoValidCanvasError:
        """``e``, naming the canvas of a batch it is about."""
        return NoValidCanvasError(f"canvas {b} of the batch of {B}: {e}") if B > 1 else e

    def _no_canvas_message(self, L: int, s0: int, partial: bool) -> str:
        return (f"no valid canvas of {L} positions from state {s0}"
                + ("" if partial else " ending with the stop token; pass partial=True to continue in another canvas"))

    def _scores(self, xs: Any, want_sum: bool = True, want_x: bool = False) -> "_Scores":
        """One pass over the logits (B * L rows): atom statistics on the host, from the
        compiled scan or, for logits on a device, from ``device_passes``."""
        B, L, V = xs.shape
        flat = xs.reshape(B * L, V)
        block_sums = np.zeros((0, 0), np.float32)
        if isinstance(xs, torch.Tensor):
            rowmax_dev, rowmax, asum, asumx, amax, aarg = device_passes.reduce_atoms(
                flat, self._atom_layout(V, xs.device), want_sum, want_x)
        else:
            rowmax_dev = None
            atoms = self._sorted_atoms(V)
            if want_sum:
                block_sums = np.empty((B * L, atoms.blocks[-1]), np.float32)
            rowmax, asum, asumx, amax, aarg = dp.reduce_atoms(flat, atoms, want_sum, want_x, block_sums)
        # (every term is at most 1 from the row's best: a sum that is not finite comes from
        # a nan or +inf logit, whichever pass computed it; without the sums a nan counts as
        # -inf, as in max(), but a +inf would be every canvas's score through it)
        if want_sum and not np.isfinite(asum).all():
            self._refuse_logits(flat, np.flatnonzero(~np.isfinite(asum).all(axis=1)), L, V, "nan or +inf")
        if not want_sum and np.isposinf(amax).any():
            self._refuse_logits(flat, np.flatnonzero(np.isposinf(amax).any(axis=1)), L, V, "+inf")
        gsum = _group_values_by_canvas(dp.group_node_sums, asum, self._group_plan, B) if want_sum else []
        return _Scores(flat, rowmax, asum, asumx, amax, aarg, gsum, self._group_plan.n_groups, block_sums,
                       rowmax_dev)

    def _refuse_logits(self, flat: Any, rows: np.ndarray, L: int, V: int, what: str) -> None:
        """Raise the error for ``rows`` of ``flat`` (B * L, V) that hold a nan or +inf logit
        at a token the grammar allows."""
        where = ", ".join(f"canvas {n // L} position {n % L}" for n in rows[:5].tolist())
        first = flat[int(rows[0])]
        first = first.cpu().numpy() if isinstance(first, torch.Tensor) else first
        hit = (first == np.inf) if what == "+inf" else ~(first < np.inf)  # (nan fails the test too)
        bad = np.flatnonzero(hit & (self._atom_of(V) >= 0))
        raise GrammarInputError(
            f"the logits are {what} at a token the grammar allows somewhere on a canvas (at {where}"
            f"{', ...' if rows.size > 5 else ''}; {rows.size} position(s) in all; the first at token(s) "
            f"{bad[:5].tolist()}): every such logit is refused, not only where the token may go. A model "
            "overflowing in float16 or bfloat16 gives such logits, as do float64 logits beyond float32's range "
            "(a huge finite logit, such as 1e20, forces its token instead)")

    def _sample_one(self, sc: "_Scores", sl: slice, sup: dp.Support, passes: _Passes, s0: int, partial: bool,
                    prune: bool, uniforms: np.ndarray) -> list[int]:
        """One canvas's sample: its atoms drawn from the fast passes' beta where it stayed
        in range (every draw too), else in log space; then a token inside each atom."""
        plan = self._group_plan
        atoms, ok, log_inside = None, False, None
        if passes.in_range and sup.dense:
            atoms, ok = dp._sample_atoms(sc.asum[sl], sc.canvas_node_sums(sl), passes.beta, passes.beta_totals,
                                         self._layout.rank, s0, *self._out_edges, plan.base, plan.extra_offsets,
                                         plan.extra, uniforms)
        elif passes.in_range:
            atoms, ok = dp._sample_atoms_live(sc.asum[sl], sc.canvas_node_sums(sl), sup.offsets, sup.states,
                                              passes.beta, s0, *self._out_edges, plan.base, plan.extra_offsets,
                                              plan.extra, uniforms)
        if not ok:
            lc = self._log_space(sc, sl, sup, s0, partial, prune, uniforms=uniforms)
            atoms, log_inside = lc.atoms, lc.log_inside
        return self._tokens_in_atoms(sc, sl, atoms, uniforms, log_inside)

    def _tokens_in_atoms(self, sc: "_Scores", sl: slice, atoms: np.ndarray, uniforms: np.ndarray,
                         log_inside: np.ndarray | None) -> list[int]:
        """A token inside each position's atom (L,), weight exp(logit); ``log_inside`` (L,
        K) where the atoms were drawn in log space (each atom's sum from its own best
        token, else the scan's from the row's)."""
        if sc.rowmax_dev is None:  # (the host's draw weighs tokens from their atom's best: no range to leave)
            tokens = dp.sample_tokens(sc.flat[sl], sc.amax[sl], sc.aarg[sl], sc.block_sums[sl], atoms,
                                      self._sorted_atoms(sc.flat.shape[1]), uniforms)
            return tokens.tolist()
        rows = np.arange(sl.start, sl.stop)
        best, best_logit = sc.aarg[rows, atoms], sc.amax[rows, atoms]
        if log_inside is None:
            ref, mass = sc.rowmax[rows], sc.asum[rows, atoms]
        else:  # each atom's total taken from its own best token, which no range can lose
            ref = best_logit.astype(np.float64)
            mass = np.exp(log_inside[np.arange(atoms.shape[0]), atoms])
        layout = self._atom_layout(sc.flat.shape[1], sc.flat.device)
        return device_passes.tokens_in_atoms(sc.flat[sl], layout, atoms, best, best_logit, ref, mass,
                                             uniforms[:, 2]).tolist()

    def _log_space(self, sc: "_Scores", sl: slice, sup: dp.Support, s0: int, partial: bool, prune: bool, *,
                   factors: bool = False, uniforms: np.ndarray | None = None) -> "_LogCanvas":
        """One canvas (rows ``sl``) redone in log space (see log_canvas), for logits whose
        weights leave float64's range: log F (L, K) with ``factors``, the sampled atoms
        (L,) with ``uniforms`` (empty arrays for what was not asked), and the sums they
        were taken from.

        Huge finite logits (masks, see ``masks``) can leave float64 with none of the
        canvases' differences: a token each valid canvas must pass, masked with -3.4e38,
        or a token forced with +1e20 where the grammar forbids it (the canvases' total
        weight then lies ``masks.MASK_LOGIT`` below the rows' best logits). Each mask is
        then replaced by its stand-in: at once where a mask is negative (no pass is
        spent on the canvas as it is), after the passes where the total says so."""
        ta = self.automaton
        L = sl.stop - sl.start
        log_inside = sc.log_stats(self._sorted_atoms(sc.flat.shape[1]))[2][sl]
        best = masks.effective_maxima(sc.amax[sl], sc.rowmax[sl])
        frame = None
        if masks.has_masks(best, negative=True):
            frame, log_asum, log_gsum, sup = self._stand_in_sums(best, log_inside, s0, partial, prune)
        else:
            log_asum, log_gsum = self._log_sums(sc, sl)
            to_finish = self._to_finish(partial) if prune and sup.live.shape[0] else None
            if to_finish is not None and L * self.automaton.n_edges >= pruning.BOUNDED_SWEEP_MIN_EDGES:
                # The whole support: its sweeps gave up, or its fast passes left float64's
                # range. Where a sure model's best tokens are invalid (a text answer where a
                # call is forced), nearly every prefix is heavy and every way on from it light:
                # a sweep that bounds each cell's suffix keeps few cells (~1k of 700k at 5
                # tools), and the passes here run over those (``pruning.way_on_bounds``, over
                # the support's rows)
                kept = pruning.probable_support(to_finish, s0, self._out_edges, sc.rowmax[sl], gsum=log_gsum,
                                                asum=sc.asum[sl], in_logs=True, bound_suffixes=True,
                                                whole=(sup, self._layout))
                sup = sup if kept is None else kept
        lb, log_f, column, lists, log_mass = self._log_passes(log_gsum, sup, s0, factors)
        if frame is None and -masks.MASK_LOGIT >= log_mass > -np.inf and masks.has_masks(best):  # (nan: none)
            frame, log_asum, log_gsum, sup = self._stand_in_sums(best, log_inside, s0, partial, prune)
            lb, log_f, column, lists, log_mass = self._log_passes(log_gsum, sup, s0, factors)
        ok = log_mass > -np.inf
        atoms = np.zeros(0, np.int32)
        if ok and uniforms is not None:
            atoms, ok = log_canvas.log_sample_atoms(log_asum, log_gsum, lb.reshape(-1), column, *lists, s0,
                                                    *self._out_edges, ta.group_atoms, ta.group_offsets, uniforms)
        if not ok:
            raise NoValidCanvasError(self._no_finite_canvas_message(L, s0))
        return _LogCanvas(log_f, atoms, log_asum, log_inside, frame, kept=sup.live.shape[0] == 0)

    def _stand_in_sums(self, best: np.ndarray, log_inside: np.ndarray, s0: int, partial: bool, prune: bool
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dp.Support]:
        """For one canvas whose atoms' best logits ``best`` (L, K) hold masks: the frame of
        ``_LogCanvas``, the atoms' and groups' log sums with each mask's stand-in, and the
        cells to run over: those a sweep in log space keeps (with ``prune``, where it keeps
        few: masks the canvases can avoid), else the whole support (a sweep forward cannot
        see a mask that every canvas passes at its end)."""
        L = best.shape[0]
        v = masks.stand_ins(best)  # (L, K)
        with np.errstate(invalid="ignore"):  # (rows without a finite logit: no canvas, found later)
            frame = v - np.max(v, axis=1, keepdims=True)  # (L, K) each atom's best from its row's
        log_asum = frame + log_inside
        log_gsum = log_canvas.log_sums_by_group(log_asum, *self._group_plan)
        to_finish = self._to_finish(partial) if prune else None
        kept = None if to_finish is None else pruning.probable_support(
            to_finish, s0, self._out_edges, np.zeros(L), gsum=log_gsum, asum=np.exp(log_asum), in_logs=True)
        return frame, log_asum, log_gsum, kept if kept is not None else self._support(L, s0, partial)

    def _log_passes(self, log_gsum: np.ndarray, sup: dp.Support, s0: int, factors: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray], float]:
        """The log-space passes over one canvas's support from ``s0``, the groups' log sums
        ``log_gsum`` (L, G): (the backward values, log F (L, K) with ``factors`` (else
        (0, 0)), the backward values' column of each state and their lists (for
        ``log_canvas.log_sample_atoms``), the log of the canvases' total weight: -inf
        where none has any, nan where the factors found none)."""
        ta = self.automaton
        lay = self._layout
        log_f = np.zeros((0, 0))
        no_lists = np.zeros(0, np.int64), np.zeros(0, np.int32)
        if not sup.live.shape[0]:  # a pruned support: its lists alone
            lb = log_canvas.kept_log_backward(log_gsum, sup.offsets, sup.states, *self._out_edges, ta.n_states)
            column, lists = np.zeros(0, np.int64), (sup.offsets, sup.states)
            log_mass, ok = float(lb[sup.offsets[0]]), True
            if log_mass > -np.inf and factors:
                log_f, ok = log_canvas.kept_log_factors(log_gsum, lb, sup.offsets, sup.states, *self._out_edges,
                                                        ta.group_atoms, ta.group_offsets, ta.n_atoms, ta.n_states)
        elif sup.dense:  # the fast passes' layout: runs, fans, single edges (by row)
            edges = (lay.src, lay.dst, lay.group, lay.runs, sup.clip, lay.fans)
            # (into the kept beta buffer: no pass's beta is alive here, as in pruning's way_on_bounds)
            lb, ok = log_canvas.dense_log_backward(log_gsum, sup.live, *edges,
                                                   out=dp.MESSAGES.get(dp.BETA, *sup.live.shape))
            column, lists = lay.rank, no_lists  # lb's column of each state: its row
            log_mass = float(lb[0, column[s0]]) if ok else -np.inf
            if log_mass > -np.inf and factors:
                log_f, ok = log_canvas.dense_log_factors(log_gsum, lb, sup.live, *edges, lay.in_row, lay.in_other,
                                                         lay.in_group, column[s0], ta.atom_groups,
                                                         ta.atom_group_offsets)
        else:  # lists of edges by state, each position's states on numba's threads
            live = np.ascontiguousarray(sup.live[:, lay.rank])  # (L + 1, S) by state
            lb = log_canvas.log_backward(log_gsum, live, *self._out_edges)
            column, lists = np.arange(ta.n_states), no_lists
            log_mass, ok = float(lb[0, s0]), True
            if log_mass > -np.inf and factors:
                log_f, ok = log_canvas.log_factors(log_gsum, lb, live, s0, *self._in_edges, ta.atom_groups,
                                                   ta.atom_group_offsets)
        return lb, log_f, column, lists, log_mass if ok else math.nan

    def _log_sums(self, sc: "_Scores", sl: slice) -> tuple[np.ndarray, np.ndarray]:
        """The logs of the atoms' (L, K) and the groups' (L, G) sums in rows ``sl``,
        exact where the sums leave float64's range (taken once a step)."""
        log_asum = sc.log_stats(self._sorted_atoms(sc.flat.shape[1]))[0]
        if not sc._log_gsum:
            sc._log_gsum.append(log_canvas.log_sums_by_group(log_asum, *self._group_plan))
        return log_asum[sl], sc._log_gsum[0][sl]

    def _factor_logs(self, sc: "_Scores", F: list[np.ndarray | None], in_log_space: dict[int, _LogCanvas], B: int,
                     L: int, entropy: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        """log F (B * L, K) of the fast passes' factors (F: each canvas's, None where
        taken in log space), and the log-space ones where taken; with ``entropy`` the
        (B, L) entropies too, from the atom statistics: the scan's, else (canvases redone
        in log space, whose sums may have underflowed) ``log_canvas``'s, from the
        masks' stand-ins where they stood in."""
        K = self.automaton.n_atoms
        if B == 1 and F[0] is not None:  # (one canvas: its factors as they came, no copy)
            factors = F[0]
        else:
            factors = np.concatenate([np.zeros((L, K)) if f is None else f for f in F]) if F else np.zeros((0, K))
        log_f, H = dp.factor_logs(factors, sc.asum, sc.asumx if entropy else None)
        for b, lc in in_log_space.items():
            log_f[b * L:(b + 1) * L] = lc.log_f
        if H is None:
            return log_f, None
        H = H.reshape(B, L)
        if in_log_space:
            mean_gap = sc.log_stats(self._sorted_atoms(sc.flat.shape[1]))[1]
            for b, lc in in_log_space.items():
                sl = slice(b * L, (b + 1) * L)
                if lc.frame is None:
                    H[b] = log_canvas.entropies(lc.log_f, lc.log_asum, mean_gap[sl], sc.amax[sl], sc.rowmax[sl])
                else:  # (each atom's gap from its row: the frame, from 0)
                    H[b] = log_canvas.entropies(lc.log_f, lc.log_asum, mean_gap[sl], lc.frame, np.zeros(L))
        return log_f, torch.from_numpy(H)

    def _log_marginals(self, sc: "_Scores", log_f: np.ndarray, B: int, L: int, out: torch.Tensor | None = None,
                       in_log_space: dict[int, _LogCanvas] | None = None) -> torch.Tensor:
        """The (B, L, V) log-marginals from log F (B * L, K): x - rowmax + log F, or from
        each atom's best token (``device_passes.atom_references``) on the device path and
        for the canvases of ``in_log_space`` whose masks stood in (their frames)."""
        N, V = sc.flat.shape
        if N == 0:  # (an empty batch, or canvases of no position: no row to write)
            return torch.empty((B, L, V), dtype=torch.float32, device=getattr(sc.flat, "device", "cpu")) \
                if out is None else out.view(B, L, V)
        framed = [(slice(b * L, (b + 1) * L), lc.frame) for b, lc in (in_log_space or {}).items()
                  if lc.frame is not None]
        if sc.rowmax_dev is not None:
            # (2, N, K + 1) float32, written where its copy to the device starts (page-locked there)
            refs = device_passes.host_tensor((2, N, log_f.shape[1] + 1), torch.float32, sc.flat.device)
            refs_host = device_passes.atom_references(log_f, sc.amax, sc.rowmax, out=refs.numpy())  # (its view)
            for sl, frame in framed:
                refs_host[:, sl] = device_passes.atom_references(log_f[sl], sc.amax[sl], sc.rowmax[sl], frame)
            logp = device_passes.log_marginals(sc.flat, refs, self._atom_layout(V, sc.flat.device).index,
                                               None if out is None else out.view(N, V))
            return logp.view(B, L, V)
        host = np.empty_like(sc.flat) if out is None else out.view(N, V).numpy()
        dp.write_marginals(sc.flat, sc.rowmax, self._atom_of(V), log_f, host)
        for sl, frame in framed:  # (rare: those rows again, from each atom's best, by the torch ops)
            refs = device_passes.atom_references(log_f[sl], sc.amax[sl], sc.rowmax[sl], frame)
            device_passes.log_marginals(torch.from_numpy(sc.flat[sl]), refs,
                                        self._atom_layout(V, torch.device("cpu")).index, torch.from_numpy(host[sl]))
        return torch.from_numpy(host).view(B, L, V) if out is None else out.view(B, L, V)

    @staticmethod
    def _check_out(out: Any, xs: Any, batched: bool) -> Any:
        """``out`` must take the marginals as they are computed: the shape of the logits as
        given (``xs`` is them as (B, L, V), ``batched`` whether they came so), float32,
        contiguous, on the device the vocabulary passes run on, outside autograd. -> the
        logits to read: ``xs``, or a copy of it where ``out`` shares its memory (the
        marginals written over the logits, as torch's ``out=`` allows): rows that need
        the masks' stand-ins are read again after the write."""
        shape = tuple(xs.shape if batched else xs.shape[1:])
        device = xs.device if isinstance(xs, torch.Tensor) else torch.device("cpu")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != torch.float32 \
                or not out.is_contiguous() or out.device != device:
            got = (f"{tuple(out.shape)} {out.dtype} on {out.device}{'' if out.is_contiguous() else ', not contiguous'}"
                   if isinstance(out, torch.Tensor) else type(out).__name__)
            raise GrammarInputError(f"out must be a contiguous float32 tensor of shape {shape} on {device}; got {got}")
        if out.requires_grad:
            raise GrammarInputError("out requires grad: the marginals are written into it outside autograd; pass a "
                                    "tensor made under torch.no_grad() or detached")
        if isinstance(xs, torch.Tensor):
            shared = out.untyped_storage().data_ptr() == xs.untyped_storage().data_ptr()
            return xs.clone() if shared else xs
        return xs.copy() if np.may_share_memory(out.numpy(), xs) else xs

    @_holding_messages
    def sample(self, logits: Any, generator: torch.Generator | None = None,
               state: int | Sequence[int] | None = None, partial: bool = False, prune: bool = True) -> Any:
        """An exact sample of the per-position product distribution restricted to the language.

        ``prune`` skips the lattice cells whose canvases weigh less than 2**-56 of the total
        together (see ``grammar.pruning``); ``prune=False`` draws from every valid canvas.
        """
        xs, batched = self._prepare(logits)
        B, L, V = xs.shape
        sc = self._scores(xs)
        _check_generator(generator)
        uniforms = torch.rand((B, L, 3), generator=generator, dtype=torch.float64).numpy()
        out = []
        b = 0
        try:
            for b, s0 in enumerate(self._states(state, B)):
                sl = slice(b * L, (b + 1) * L)
                sup, _, fast = self._step_support(sc, sl, s0, partial, prune, sums=True)
                passes = self._canvas_passes(sup, s0, partial, gsum=sc.canvas_gsum(sl)) if fast else _OUT_OF_RANGE
                out.append(self._sample_one(sc, sl, sup, passes, s0, partial, prune, uniforms[b]))
        except NoValidCanvasError as e:  # (which canvas of a batch has none)
            raise self._in_batch(e, b, B) from None
        return out if batched else out[0]

    @_holding_messages
    def marginals(self, logits: Any, state: int | Sequence[int] | None = None, partial: bool = False,
                  return_entropy: bool = False, out: torch.Tensor | None = None, prune: bool = True) -> Any:
        """Constrained posterior marginals as log-probs, shape like ``logits`` (float32, on
        the logits' device).

        With ``return_entropy=True`` also returns each position's entropy (nats), shape
        (L,) or (B, L), computed from atom statistics (no second pass over the vocab).
        ``out``, a contiguous float32 tensor of the logits' shape on their device,
        receives the marginals instead of a new tensor: a loop that calls this every step
        should pass one. A fresh (L, V) tensor is first written page by page: at Gemma's
        262,144 tokens (268 MB at L=256), right after a model's forward has freed its
        buffers, that took ~0.35 s on our 2-core test machine, more than the marginals.

        ``prune`` skips the lattice cells whose canvases weigh less than 2**-56 of the total
        together (see ``grammar.pruning``): every marginal is then within 2**-56 of its
        value over all canvases, and a token whose probability is below that may come out
        -inf. ``prune=False`` sums over every valid canvas.
        """
        xs, batched = self._prepare(logits)
        B, L, V = xs.shape
        if out is not None:
            xs = self._check_out(out, xs, batched)
        sc = self._scores(xs, want_x=return_entropy)
        F: list[np.ndarray | None] = []  # each canvas's atom factors (L, K) (None: taken in log space)
        in_log_space: dict[int, _LogCanvas] = {}  # canvas -> its log F, where the sums left float64's range
        b = 0
        try:
            for b, s0 in enumerate(self._states(state, B)):
                sl = slice(b * L, (b + 1) * L)
                sup, _, fast = self._step_support(sc, sl, s0, partial, prune, sums=True)
                passes = (self._canvas_passes(sup, s0, partial, gsum=sc.canvas_gsum(sl), factors=True)
                          if fast else _OUT_OF_RANGE)
                F.append(passes.F if passes.in_range else None)
                if not passes.in_range:
                    in_log_space[b] = self._log_space(sc, sl, sup, s0, partial, prune, factors=True)
        except NoValidCanvasError as e:  # (which canvas of a batch has none)
            raise self._in_batch(e, b, B) from None
        log_f, H = self._factor_logs(sc, F, in_log_space, B, L, entropy=return_entropy)
        logp = self._log_marginals(sc, log_f, B, L, out, in_log_space)
        result = logp if batched else logp[0]
        if H is None:
            return result
        return result, (H if batched else H[0])

    @_holding_messages
    def denoise_step(self, logits: Any, generator: torch.Generator | None = None,
                     state: int | Sequence[int] | None = None, partial: bool = False,
                     out: torch.Tensor | None = None, prune: bool = True) -> "StepOutput":
        """Everything one denoising step needs, sharing one pass over the logits.

        Returns the Viterbi canvas (the argmax canvas the model emits), an exact sample
        (the denoiser sample), the constrained log-marginals (for self-conditioning) and
        their per-position entropies (for entropy-bound acceptance). Shapes follow
        ``logits``: (L, V) -> lists / (L, V) / (L,); (B, L, V) -> batched. Logits on a
        GPU stay there: only (L, atoms) statistics cross to the host, and the marginals
        come back on the logits' device (see ``device_passes``). ``out``, a contiguous
        float32 tensor of the logits' shape on their device, receives the marginals
        instead of a new tensor (the engine passes rows of its self-conditioning buffer).

        With ``prune`` (the default) the passes skip the cells of the canvas's lattice that
        neither the Viterbi canvas passes nor canvases of more than 2**-56 of the total
        weight together (see ``grammar.pruning``), nearly all of them: the Viterbi canvas is
        the same, samples, entropies and marginals are within 2**-56 of the total weight
        of their values over all canvases (a token whose probability is below that may get
        a log-marginal of -inf). ``prune=False`` runs the whole lattice. ``pruned`` in the
        output says where the passes ran on the pruned lattice and where pruning gave up
        (too many cells carry weight: flat logits) and they ran on the whole support; a
        loop of steps can skip trying for a while after that (``pruning.PruningSchedule``,
        as the engine does).
        """
        _check_generator(generator)
        xs, batched = self._prepare(logits)
        B, L, V = xs.shape
        if out is not None:
            xs = self._check_out(out, xs, batched)
        sc = self._scores(xs, want_x=True)
        gmax, amax, moved = self._viterbi_scores(sc, B)
        prune = prune and not moved
        uniforms = torch.rand((B, L, 3), generator=generator, dtype=torch.float64).numpy()
        F: list[np.ndarray | None] = []  # each canvas's atom factors (L, K) (None: taken in log space)
        in_log_space: dict[int, _LogCanvas] = {}
        best: list[list[int]] = []
        samples: list[list[int]] = []
        pruned: list[bool] = []
        b = 0
        try:
            for b, s0 in enumerate(self._states(state, B)):
                sl = slice(b * L, (b + 1) * L)
                sup, kept, fast = self._step_support(sc, sl, s0, partial, prune, sums=True, gmax=gmax[b])
                pruned.append(kept)
                top = (amax[sl], sc.aarg[sl])
                forced = self._forced_by_mask(sc, sl)
                passes = (self._canvas_passes(sup, s0, partial, gsum=sc.canvas_gsum(sl), factors=True, gmax=gmax[b],
                                              best=top, forced=forced) if fast else _OUT_OF_RANGE)
                path = passes.path
                if path is None:  # (the Viterbi pass shared a sweep that stopped early, or never ran)
                    path = self._canvas_passes(sup, s0, partial, gmax=gmax[b], best=top, forced=forced).path
                    assert path is not None
                best.append(path)
                F.append(passes.F if passes.in_range else None)
                if passes.in_range:
                    samples.append(self._sample_one(sc, sl, sup, passes, s0, partial, prune, uniforms[b]))
                else:
                    lc = in_log_space[b] = self._log_space(sc, sl, sup, s0, partial, prune, factors=True,
                                                           uniforms=uniforms[b])
                    pruned[-1] = pruned[-1] or lc.kept  # (its passes ran over kept cells)
                    samples.append(self._tokens_in_atoms(sc, sl, lc.atoms, uniforms[b], lc.log_inside))
        except NoValidCanvasError as e:  # (which canvas of a batch has none)
            raise self._in_batch(e, b, B) from None
        log_f, H = self._factor_logs(sc, F, in_log_space, B, L, entropy=True)
        assert H is not None
        logp = self._log_marginals(sc, log_f, B, L, out, in_log_space)
        if batched:
            return StepOutput(best, samples, logp, H, pruned)
        return StepOutput(best[0], samples[0], logp[0], H[0], pruned[0])

    def _support(self, length: int, state: int, partial: bool) -> dp.Support:
        """The live states per position (lists and the passes' masks) for canvases of
        ``length`` from ``state`` (cached: every denoising step of a canvas reuses it)."""
        self._check_partial(partial)
        self._check_length(length)
        kind = self._canvas_pass_kind
        key = (length, state, partial, kind)
        hit = self._support_cache.get(key)
        if hit is None:
            hit = dp.support(self._layout, state, self._final(partial), length, kind)
            if hit.offsets[1] == 0:  # the start state is on no valid canvas
                raise NoValidCanvasError(self._no_canvas_message(length, state, partial))
            _make_room(self._support_cache, sum(a.nbytes for a in (hit.offsets, hit.states, hit.live, hit.clip)),
                       SUPPORT_CACHE_BYTES, _SUPPORT_CACHE_MIN, most=16)
            self._support_cache[key] = hit
        return hit

    def _step_support(self, sc: "_Scores", sl: slice, s0: int, partial: bool, prune: bool, *, sums: bool,
                      gmax: np.ndarray | None = None) -> tuple[dp.Support, bool, bool]:
        """The cells a step's passes run over for the canvas of rows ``sl`` from ``s0``,
        whether they were pruned, and whether the fast passes may run on them: with
        ``prune`` those that can carry weight (``sums``: the step's sums) or the Viterbi
        canvas (``gmax`` (L, G)), where few of them can (``grammar.pruning``); else the
        whole support. The fast passes run where every atom's sum stayed in float64's
        range, or where those that fell out of it (low temperatures: an atom 708 nats
        below its row's best) weigh less than 2**-57 of the kept canvases
        (``probable_support``'s ``log_lost``), or, where pruning gave up, of the valid
        canvases (``pruning.out_of_range_weighs_nothing``); else the caller goes to log
        space, over the cells a sweep in log space keeps where it keeps few."""
        L = sl.stop - sl.start
        log_lost = sc.log_underflow(sl) if sums else -math.inf
        in_range = log_lost == -math.inf
        to_finish = self._to_finish(partial) if prune else None
        if to_finish is not None:
            ref = sc.rowmax[sl] if sums else sc.amax[sl].max(axis=1).astype(np.float64)  # each row's best allowed logit
            found = pruning.sweep_support(to_finish, s0, self._out_edges, ref,
                                          gsum=sc.canvas_gsum(sl) if sums else None,
                                          asum=sc.asum[sl] if sums else None, gmax=gmax, log_lost=log_lost)
            if found.support is not None:
                return found.support, True, True
            if not in_range or found.too_light:  # (the atoms out of range may carry the weight; or the
                # canvases weigh too little for float64's cuts: a sure model whose best tokens the grammar forbids)
                log_gsum = self._log_sums(sc, sl)[1]
                kept = pruning.probable_support(to_finish, s0, self._out_edges, ref, gsum=log_gsum, asum=sc.asum[sl],
                                                gmax=gmax, in_logs=True, whole_in_range=in_range)
                if kept is not None:
                    return kept, True, False
            if not in_range:  # (too many cells carry weight to prune, but the atoms out of range may weigh nothing)
                in_range = pruning.out_of_range_weighs_nothing(found.log_walk, log_lost)
        return self._support(L, s0, partial), False, in_range

    def _to_finish(self, partial: bool) -> np.ndarray | None:
        """``pruning.fewest_to_finish`` of the accepting states (cached)."""
        self._check_partial(partial)
        if partial not in self._fewest_to_finish:
            self._fewest_to_finish[partial] = pruning.fewest_to_finish(self._final(partial), self._in_edges,
                                                                       self._out_edges)
        return self._fewest_to_finish[partial]

    def allowed_tokens(self, state: int | None = None) -> np.ndarray:
        """(V,) bool: the tokens that may come next from ``state``, for token-by-token
        (autoregressive) decoding. Cached per state."""
        q = self._state(state)
        hit = self._allowed_cache.get(q)
        if hit is None:
            ta = self.automaton
            hit = ta.allowed_atoms(q)[ta.atom_of_token]  # (-1, never allowed: the last, False)
            _make_room(self._allowed_cache, hit.nbytes, ALLOWED_CACHE_BYTES, _ALLOWED_CACHE_MIN)
            self._allowed_cache[q] = hit
        return hit

    def forced_prefix(self, state: int | None = None, limit: int | None = None) -> list[int]:
        """Tokens spelling what every sentence says next from ``state``.

        Where the language continues in one way only for a while (``<|tool_call>call:get_weather{city:``
        for a single tool), that text is covered greedily by the longest tokens the grammar
        allows there: one spelling, not every tokenization of it, so an engine can write it
        into the canvas before denoising and run the DP on the rest. At most ``limit`` tokens.

        >>> from agentloop.grammar import byte_tokenizer, compile_schema
        >>> g = compile_schema({"const": "hi"}, byte_tokenizer())
        >>> g.vocab.symbols(g.forced_prefix()) == g.vocab.symbols(byte_tokenizer().encode('"hi"').ids) + [g.vocab.wire_format.symbol("${eos}")]
        True
        """
        q = s0 = self._state(state)
        dfa = self.dfa
        syms: list[int] = []
        cap = (limit if limit is not None else 1 << 30) * self._max_token_symbols
        while len(syms) < cap and q >= 0 and not dfa.accept[q]:
            live = np.flatnonzero(dfa.trans[q] >= 0)
            if live.size != 1:
                break
            mask = dfa.class_masks[int(live[0])]
            if mask & (mask - 1):  # more than one symbol in the class
                break
            syms.append(mask.bit_length() - 1)
            q = int(dfa.trans[q, live[0]])
        out: list[int] = []
        pos = 0
        t_state = s0
        index = self._token_of_symbols
        while pos < len(syms) and (limit is None or len(out) < limit):
            for n in range(min(self._max_token_symbols, len(syms) - pos), 0, -1):
                tok = index.get(tuple(syms[pos : pos + n]))
                if tok is not None and self.automaton.step(t_state, tok) >= 0:
                    break
            else:
                break
            out.append(tok)
            t_state = self.automaton.step(t_state, tok)
            pos += n
        return out

    @cached_property
    def _token_of_symbols(self) -> dict[tuple[int, ...], int]:
        index: dict[tuple[int, ...], int] = {}
        for i, syms in enumerate(self.vocab.token_symbols):
            if syms and self.automaton.atom_of_token[i] >= 0:
                index.setdefault(syms, i)
        return index

    @cached_property
    def _max_token_symbols(self) -> int:
        return max((len(t) for t in self.vocab.token_symbols), default=1)

    def forced_tokens(self, length: int, state: int | None = None, partial: bool = False) -> list[int]:
        """Per position of a canvas, the only token the grammar allows there, or -1."""
        s0 = self._state(state)
        ta = self.automaton
        self._check_length(length)
        to_finish = self._to_finish(partial) if partial else None
        if to_finish is not None and to_finish[s0] == 0 and self._choices_for_good.any():
            # a canvas that may end anywhere, from a state that can go on for good (the
            # engine's canvases but the last): a forward sweep, cut short where a choice
            # stays open, instead of the support (73 ms a canvas at 20 tools, BPE 4k;
            # without such a choice the support's dense passes are quicker)
            return dp.forced_going_on(s0, int(length), self._choices_for_good, *self._out_edges, ta.group_atoms,
                                      ta.group_offsets, ta.atom_offsets, ta.atom_tokens).tolist()
        sup = self._support(length, s0, partial)
        return dp._forced(sup.live, self._layout.state, self._layout.rank, *self._out_edges, ta.group_atoms,
                          ta.group_offsets, ta.atom_offsets, ta.atom_tokens, length).tolist()

    @cached_property
    def _choices_for_good(self) -> np.ndarray:
        """(S,) bool: ``canvas.choices_for_good`` of the automaton."""
        ta = self.automaton
        return dp.choices_for_good(*self._out_edges, ta.group_atoms, ta.group_offsets, ta.atom_offsets,
                                   *self._in_edges[:2])

    @cached_property
    def _out_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (S + 1,), destination, group) of each state's outgoing edges."""
        ta = self.automaton
        return ta.src_offsets, ta.edge_dst, ta.edge_group

    @cached_property
    def _in_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (S + 1,), source, group) of each state's incoming edges (live-list passes)."""
        ta = self.automaton
        order = np.argsort(ta.edge_dst, kind="stable")
        offsets = np.searchsorted(ta.edge_dst[order], np.arange(ta.n_states + 1)).astype(np.int64)
        return offsets, np.ascontiguousarray(ta.edge_src[order]), np.ascontiguousarray(ta.edge_group[order])

    @cached_property
    def _group_plan(self) -> dp.GroupPlan:
        """How the step builds its groups' statistics from its atoms' (see ``canvas.GroupPlan``)."""
        ta = self.automaton
        return dp.group_plan(ta.group_atoms, ta.group_offsets, ta.n_atoms)

    @cached_property
    def _layout(self) -> EdgeLayout:
        """The states and edges in the order the canvas passes read them."""
        ta = self.automaton
        return edge_layout(ta.edge_src, ta.edge_dst, ta.edge_group, ta.n_states, ta.start, ta.src_offsets)
