"""Canvas constraint: JSON Schema -> symbol DFA -> token automaton -> exact canvas DP.

The grammar knows nothing of models: it takes logits tensors and a tokenizer.

Example (runnable; the tiny byte-level tokenizer is built in code)::

    >>> import torch
    >>> from agentloop.grammar import compile_schema, byte_tokenizer
    >>> tok = byte_tokenizer()
    >>> g = compile_schema({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
    ...                     "required": ["n"]}, tok)
    >>> ids = g.viterbi(torch.randn(12, tok.get_vocab_size()))
    >>> value = g.parse(ids); isinstance(value["n"], int) and value["n"] <= 9
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import AutomatonTooLarge, SchemaError, VocabularyError
from . import cache as disk_cache
from . import charset as cs
from .copy import (FIXED_HOLE_KINDS, HOLE_SYMBOLS, STRING_NUMBERS_HOLE, TEXT_NUMBERS_HOLE, HolesExhausted,
                   copied_number_node, holes_fit, number_hole_language, uses_copy)
from .compiled import CompiledGrammar, GrammarStats, ParsedOutput, StepOutput, ToolCall
from .fsa import Dfa, Node, alt, embed, literal, product, rep, separated, seq, substitute, sym, to_dfa
from .schema import Narrowing, SchemaCompiler, SchemaOptions, _copies_dfa
from .token_automaton import TokenAutomaton, build_token_automaton, spells_prefix
from .vocabulary import Vocabulary
from .wireformat import EOS, PAD, WireFormat, available_wire_formats, load_wire_format

__all__ = [
    "CompiledGrammar",
    "GrammarStats",
    "Narrowing",
    "ParsedOutput",
    "SchemaOptions",
    "StepOutput",
    "ToolCall",
    "ToolSchema",
    "Vocabulary",
    "WireFormat",
    "available_wire_formats",
    "byte_tokenizer",
    "check_schema",
    "clear_caches",
    "compile_schema",
    "compile_tools",
    "load_wire_format",
]

_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True)
class ToolSchema:
    """A tool as the grammar sees it: a name, a description and a parameters schema."""

    name: str
    parameters: Mapping[str, Any]
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise SchemaError(f"a tool's name must be a string, got {type(self.name).__name__} {self.name!r}",
                              pointer="/name")
        _check_object_schema(self.name, self.parameters, "/parameters")
        if not isinstance(self.description, str):
            raise SchemaError(f"tool {self.name!r}: description must be a string, got "
                              f"{type(self.description).__name__}", pointer="/description")

    @classmethod
    def coerce(cls, tool: Any) -> "ToolSchema":
        """Accept a ToolSchema, ``{"name", "parameters", "description"}`` (the parameters
        also as Anthropic's ``input_schema`` or MCP's ``inputSchema``), OpenAI's
        ``{"type": "function", "function": {...}}``, or anything with a ``.tool_schema``.

        >>> ToolSchema.coerce({"name": "w", "input_schema": {"type": "object"}}).parameters
        {'type': 'object'}
        >>> ToolSchema.coerce({"name": "w", "parameter": {"type": "object"}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        agentloop.errors.SchemaError: tool 'w' has no parameters but a key 'parameter': ... at '/parameter'
        """
        if isinstance(tool, ToolSchema):
            return tool
        if hasattr(tool, "tool_schema"):
            return tool.tool_schema  # type: ignore[no-any-return]
        if isinstance(tool, Mapping):
            spec = tool.get("function", tool) if tool.get("type") == "function" else tool
            if not isinstance(spec, Mapping):
                raise SchemaError(f"'function' must be an object, got {type(spec).__name__}", pointer="/function")
            name = spec.get("name")
            if name is None:
                raise SchemaError("a tool needs a 'name'", pointer="")
            given = [k for k in _PARAMETER_KEYS if k in spec]
            if len(given) > 1:
                raise SchemaError(f"tool {name!r} gives its parameters twice, as {given[0]!r} and {given[1]!r}",
                                  pointer=f"/{given[1]}")
            if not given:
                unknown = sorted(k for k in spec if k not in _TOOL_KEYS)
                if unknown:  # a misspelt parameters key would leave the tool taking no arguments
                    raise SchemaError(
                        f"tool {name!r} has no parameters but a key {unknown[0]!r}: give its arguments' JSON Schema "
                        "as 'parameters' (OpenAI), 'input_schema' (Anthropic) or 'inputSchema' (MCP)",
                        pointer=f"/{unknown[0]}")
            parameters = spec[given[0]] if given else {"type": "object", "properties": {}}
            return cls(name, parameters, spec.get("description") or "")
        if callable(tool):
            raise TypeError(f"cannot use the function {getattr(tool, '__name__', tool)!r} as a tool schema: wrap it "
                            "with agentloop.tool (its schema comes from the type hints) or pass its JSON Schema")
        raise TypeError(f"cannot use {type(tool).__name__} as a tool schema")


#: Where a tool spec holds its arguments' schema: OpenAI, Anthropic, MCP.
_PARAMETER_KEYS = ("parameters", "input_schema", "inputSchema")
#: The other keys those formats give a tool; any other key beside no parameters is refused.
_TOOL_KEYS = frozenset({"name", "description", "type", "function", "strict", "title", "annotations", "outputSchema",
                        "output_schema", "cache_control", "_meta", "icons"})


def _check_object_schema(name: str, parameters: Any, pointer: str) -> None:
    """A tool's arguments are a JSON object: its parameters must be a schema that allows one."""
    if not isinstance(parameters, Mapping):
        raise SchemaError(f"tool {name!r}: parameters must be a JSON Schema object such as "
                          f'{{"type": "object", "properties": {{...}}}}, got {type(parameters).__name__} '
                          f"{parameters!r}", pointer=pointer)
    types = parameters.get("type", "object")
    if types != "object" and not (isinstance(types, list) and "object" in types):
        raise SchemaError(f"tool {name!r}: a call's arguments are a JSON object, so its parameters need "
                          f'"type": "object", got {types!r}', keyword="type", pointer=f"{pointer}/type")


# ---- caches ----------------------------------------------------------------------------

_lock = threading.Lock()
_vocab_cache: "weakref.WeakKeyDictionary[Any, dict[Any, Vocabulary]]" = weakref.WeakKeyDictionary()
_grammar_cache: dict[str, CompiledGrammar] = {}
_GRAMMAR_CACHE_SIZE = 64


def _vocabulary(tokenizer: Any, wf: WireFormat, stop_token: Any, pad_token: Any,
                aliases: Mapping[str, str] | None) -> Vocabulary:
    if isinstance(tokenizer, Vocabulary):
        return tokenizer
    key = (wf.name, wf.source, stop_token, pad_token, tuple(sorted((aliases or {}).items())))
    with _lock:
        try:
            per_tok = _vocab_cache.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no cache
            per_tok = {}
        v = per_tok.get(key)
    if v is None:
        v = Vocabulary.from_tokenizer(tokenizer, wf, stop_token=stop_token, pad_token=pad_token, aliases=aliases)
        with _lock:
            per_tok[key] = v
    return v


@functools.cache
def _compiler_version() -> str:
    """Hash of the grammar package's sources: a compiler change never serves stale grammars."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _tail(wf: WireFormat, vocab: Vocabulary) -> Node:
    """What fills the canvas after the language's own end: pad tokens."""
    pad = wf.symbol(EOS) if vocab.pad_id == vocab.stop_id else wf.symbol(PAD)
    return rep(sym(pad))


def _compile(node_fn: Any, key_parts: Any, vocab: Vocabulary, kind: str, tools: Sequence[Any],
             persist: bool = True, too_large: Any = None,
             check: Callable[[Dfa, TokenAutomaton], None] | None = None,
             narrowings: Callable[[], Sequence[Narrowing]] | None = None) -> CompiledGrammar:
    # The wire format's file text is part of the key: editing grammars/*.toml invalidates.
    # Keys keep the schema's own order (no sort_keys): the grammar writes properties in
    # their schema order, and canonical objects in the document's order of first mention.
    key = hashlib.sha256(json.dumps([key_parts, vocab.wire_format.file_text, vocab.fingerprint, _compiler_version()],
                                    default=str).encode())
    key = key.hexdigest()[:40]
    with _lock:
        g = _grammar_cache.get(key)
    if g is not None:
        return g
    t0 = time.perf_counter()
    cached = disk_cache.load(key) if persist else None
    if cached is not None:
        dfa, automaton = cached
    else:
        made = node_fn()  # an expression, or an automaton already built (spliced copies)
        try:
            dfa = made if isinstance(made, Dfa) else to_dfa(made, vocab.wire_format.n_symbols)
        except AutomatonTooLarge as e:  # (``too_large`` names what in the schema grew it)
            raise (too_large(e) if too_large is not None else e) from None
        if dfa.is_empty():
            narrowed = list(narrowings()) if narrowings is not None else []
            why = "its constraints contradict each other" + (
                ", or the narrowing of what the compiler cannot represent exactly left nothing: "
                + "; ".join(map(str, narrowed[:3])) + ("; ..." if len(narrowed) > 3 else "") if narrowed else "")
            raise SchemaError(f"the schema admits no value at all ({why})")
        automaton = build_token_automaton(dfa, vocab)
        if check is not None:  # (on a new build only, before it is cached: it raises)
            check(dfa, automaton)
        if persist:
            disk_cache.save(key, dfa, automaton)
    g = CompiledGrammar(dfa, automaton, vocab, kind, tools, compile_seconds=time.perf_counter() - t0)
    with _lock:
        if len(_grammar_cache) >= _GRAMMAR_CACHE_SIZE:
            _grammar_cache.pop(next(iter(_grammar_cache)))
        _grammar_cache[key] = g
    return g


def _wire_format_and_options(wire_format: str | WireFormat, options: Any) -> WireFormat:
    """The wire format named (or given), after checking the options' type."""
    if not isinstance(options, SchemaOptions):
        raise TypeError(f"options must be a SchemaOptions, got {type(options).__name__}: "
                        "pass agentloop.grammar.SchemaOptions(...), e.g. SchemaOptions(strict=False)")
    return wire_format if isinstance(wire_format, WireFormat) else load_wire_format(wire_format)


def compile_schema(
    schema: Mapping[str, Any] | bool,
    tokenizer: Any,
    wire_format: str | WireFormat = "json",
    *,
    stop_token: str | int | None = None,
    pad_token: str | int | None = None,
    aliases: Mapping[str, str] | None = None,
    options: SchemaOptions = SchemaOptions(),
) -> CompiledGrammar:
    """Compile a bare value schema: the canvas holds one value, the stop token, then padding.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers tokenizer; ``stop_token``
    and ``pad_token`` default to its own. Raises :class:`SchemaError` naming the keyword
    and JSON pointer of anything the compiler cannot represent. A few bounds narrow the
    language instead, by design (see :class:`SchemaOptions`): lengths and item counts are
    counted up to ``max_counted_length`` (512), an object schema that names keys and does
    not say ``additionalProperties`` takes those keys only (``strict``), recursion and
    values under ``true`` schemas are depth-bounded; :func:`check_schema` lists where a
    schema meets those bounds.

    >>> from agentloop.grammar import byte_tokenizer
    >>> g = compile_schema({"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}, byte_tokenizer())
    >>> g.accepts_json(["b", "a"]), g.accepts_json(["a", "a", "a"])
    (True, False)
    """
    wf = _wire_format_and_options(wire_format, options)
    vocab = _vocabulary(tokenizer, wf, stop_token, pad_token, aliases)

    compilers: list[SchemaCompiler] = []  # (made on a cache miss only)

    def node() -> Node:
        compilers.append(SchemaCompiler(schema, wf, options))
        return seq(compilers[0].node(), literal(wf.lit("end")), _tail(wf, vocab))

    return _compile(node, ["value", schema, wf.name, wf.source, repr(options)], vocab, "value", (),
                    persist=not options.copy_sources, too_large=lambda e: compilers[0].too_large(e),
                    narrowings=lambda: compilers[0].narrowings)


def check_schema(schema: Mapping[str, Any] | bool, wire_format: str | WireFormat = "gemma4", *,
                 options: SchemaOptions = SchemaOptions()) -> tuple[Narrowing, ...]:
    """Raise :class:`SchemaError` (keyword + JSON pointer) if the compiler cannot represent
    ``schema``; no tokenizer needed, so tool definitions can be checked early. Returns
    where the compiled language leaves out values the schema allows (see
    :class:`Narrowing`: bounds of ``options`` that cut lengths, recursion and nesting).
    The wire format defaults to ``compile_tools``' (gemma4, whose unquoted keys are
    identifiers); pass ``"json"`` to check a schema for ``compile_schema``'s default.

    >>> check_schema({"type": "string", "maxLength": 5})
    ()
    >>> for n in check_schema({"type": "object", "properties": {"text": {"type": "string", "maxLength": 4000}}}):
    ...     print(n)
    /properties/text/maxLength: strings longer than 512 characters are not generated (SchemaOptions.max_counted_length)
    >>> check_schema({"type": "string", "pattern": "(?<=a)b"})
    Traceback (most recent call last):
    ...
    agentloop.errors.PatternError: pattern '(?<=a)b': lookaround or group flag '(?' at offset 1 is not supported at '/pattern'
    """
    wf = _wire_format_and_options(wire_format, options)
    compiler = SchemaCompiler(schema, wf, options)
    compiler.node()
    return compiler.narrowings


def compile_tools(
    tools: Sequence[Any],
    tokenizer: Any,
    wire_format: str | WireFormat = "gemma4",
    allow_text: bool = True,
    *,
    parallel_calls: bool = True,
    stop_token: str | int | None = None,
    pad_token: str | int | None = None,
    aliases: Mapping[str, str] | None = None,
    options: SchemaOptions = SchemaOptions(),
) -> CompiledGrammar:
    """Compile the envelope "one or more tool calls, or a final text" for ``tools``.

    Each tool is a :class:`ToolSchema`, a ``{"name", "parameters", "description"}`` dict
    (the parameters also as Anthropic's ``input_schema`` or MCP's ``inputSchema``) or an
    OpenAI-style function spec. ``allow_text=False`` forces at least one call;
    ``parallel_calls=False`` allows exactly one call per turn.
    """
    wf = _wire_format_and_options(wire_format, options)
    if isinstance(tools, (Mapping, str, bytes)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of tool schemas, got a {type(tools).__name__} (wrap one tool in a list)")
    specs = []
    for i, t in enumerate(tools):
        try:
            specs.append(ToolSchema.coerce(t))
        except SchemaError as e:
            raise SchemaError(e.message, keyword=e.keyword, pointer=f"/tools/{i}{e.pointer}") from None
    if not specs and not allow_text:
        raise SchemaError("compile_tools needs at least one tool when allow_text=False")
    seen: set[str] = set()
    for i, t in enumerate(specs):
        if not _TOOL_NAME.match(t.name):
            raise SchemaError(f"tool name {t.name!r} must match [A-Za-z_][A-Za-z0-9_.-]*", pointer=f"/tools/{i}/name")
        if t.name in seen:
            raise SchemaError(f"two tools are named {t.name!r}", pointer=f"/tools/{i}/name")
        seen.add(t.name)
    # Compile each parameters schema now, so errors surface with the tool's name.
    vocab = _vocabulary(tokenizer, wf, stop_token, pad_token, aliases)

    def envelope(options: SchemaOptions) -> Node:
        calls: list[Node] = []
        for i, t in enumerate(specs):
            args_dfa = _arguments_dfa(t, i, wf, options)
            if args_dfa.is_empty() and not (options.copy_sources is not None and uses_copy(t.parameters)):
                # (a tool with copied parameters may have nothing to copy yet; any other
                # tool that admits no call would vanish from the envelope unseen)
                raise SchemaError(f"tool {t.name!r} admits no arguments at all (its parameters' constraints "
                                  "contradict each other)", pointer=f"/tools/{i}/parameters")
            parts: list[Node] = []
            for part in wf.template(wf.calls["call"]):
                if part == "name":
                    parts.append(literal(t.name.encode()))
                elif part == "arguments":
                    parts.append(embed(args_dfa))
                else:
                    parts.append(literal(part))  # type: ignore[arg-type]
            calls.append(seq(*parts))
        branches: list[Node] = []
        if calls:
            one = alt(*calls)
            many = separated(one, literal(wf.lit("separator", "calls"))) if parallel_calls else one
            branches.append(seq(literal(wf.lit("open", "calls")), many, literal(wf.lit("close", "calls")),
                                literal(wf.lit("end", "calls"))))
        if allow_text:
            string_body = wf.text.get("body", "raw") == "string"
            if options.grounded_text_numbers and options.copy_holes:
                body = wf.string_node(sym(STRING_NUMBERS_HOLE)) if string_body else sym(TEXT_NUMBERS_HOLE)
            elif options.grounded_text_numbers:
                kind = "string_numbers" if string_body else "text_numbers"
                body = embed(_copies_dfa(options.copy_sources or (), wf, kind))
                body = wf.string_node(body) if string_body else body
            elif string_body:
                body = wf.string_node(rep(wf.spell_char(cs.ANY)))
            else:
                body = rep(cs.utf8_node(cs.ANY), 1)
            branches.append(seq(literal(wf.lit("open", "text")), body, literal(wf.lit("close", "text")),
                                literal(wf.lit("end", "text"))))
        return seq(alt(*branches), _tail(wf, vocab))

    def key(options: SchemaOptions) -> list[Any]:
        return ["tools", [(t.name, t.description, t.parameters) for t in specs], allow_text, parallel_calls,
                wf.name, wf.source, repr(options)]

    def node() -> Node | Dfa:
        if (options.copy_sources or options.grounded_text_numbers) and \
                all(holes_fit(t.parameters) for t in specs if uses_copy(t.parameters)):
            # The copy constraint changes every turn: compile the envelope once with holes
            # where copied values go, and splice this turn's copies in (milliseconds).
            # (without a conversation, copy_sources None, the copy marks stay unenforced:
            # only the answer's numbers are holes then)
            holed = dataclasses.replace(options, copy_sources=None if options.copy_sources is None else (),
                                        copy_holes=True)
            try:
                base = _holed_envelope(lambda: envelope(holed), key(holed), wf)
            except HolesExhausted:
                base = None  # more distinct copied number languages than hole symbols
            spliced = None if base is None else substitute(base, _hole_fills(base, options.copy_sources or (), wf))
            if spliced is not None:
                return spliced
        return envelope(options)

    def every_tool_spelled(dfa: Dfa, automaton: TokenAutomaton) -> None:
        # As a tool whose arguments admit nothing (above), a tool the tokenizer cannot
        # spell would vanish from the envelope unseen: the automaton trims it, and the
        # model never calls it. (A tool with copied parameters may have nothing to copy
        # yet.)
        for i, t in enumerate(specs):
            prefix = _call_prefix(wf, t.name)
            if prefix is None or (options.copy_sources is not None and uses_copy(t.parameters)):
                continue
            completes, begins = spells_prefix(automaton, dfa, vocab, prefix)
            if completes:
                continue
            why = ("its tokens can begin a call but never finish one: a value its parameters require needs a "
                   "character the vocabulary lacks (an uncased WordPiece has no capitals, for example)" if begins else
                   f"no sequence of its tokens spells {wf.symbols_text(prefix)!r}")
            raise VocabularyError(f"the tokenizer cannot spell any call of tool {t.name!r} (/tools/{i}): {why}. "
                                  "The model could never call it")

    # A grammar with copy sources belongs to one conversation: kept in memory, never written
    # to the disk cache (which would fill up with users' text).
    return _compile(node, key(options), vocab, "tools", specs, persist=not options.copy_sources,
                    check=every_tool_spelled)


def _call_prefix(wf: WireFormat, name: str) -> list[int] | None:
    """The symbols a call of tool ``name`` begins with, through its name and the symbol
    after it (which ends the name: no other tool's calls begin so), or None where the wire
    format's call template does not put the name before the arguments."""
    out = wf.lit("open", "calls")
    parts = wf.template(wf.calls["call"])
    for k, part in enumerate(parts):
        if part == "name":
            after = parts[k + 1] if k + 1 < len(parts) else None
            nxt = after[:1] if isinstance(after, list) else wf.lit("object_open")[:1] if after == "arguments" else []
            if not nxt or _TOOL_NAME.match("a" + chr(nxt[0])):
                return None  # (a symbol a name may hold ends no name)
            return out + list(name.encode()) + nxt
        if not isinstance(part, list):
            return None
        out = out + part
    return None


_holed: "OrderedDict[str, Dfa]" = OrderedDict()


def _memoised(cache: "OrderedDict[str, Any]", key_parts: Any, size: int, make: Any) -> Any:
    """``make()``, kept in the LRU ``cache`` under a digest of ``key_parts``. The work runs
    outside the lock (two threads may both make it once; the result is the same)."""
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()  # (in order: see _compile)
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()
    with _lock:
        cache[key] = value
        while len(cache) > size:
            cache.popitem(last=False)
    return value


def _holed_envelope(node_fn: Any, key_parts: Any, wf: WireFormat) -> Dfa:
    """A tool envelope compiled with holes for copied values (it does not depend on the
    conversation), memoised."""
    return _memoised(_holed, [key_parts, wf.file_text, _compiler_version()], 16,
                     lambda: to_dfa(node_fn(), wf.n_symbols))


def _hole_fills(envelope: Dfa, sources: tuple[str, ...], wf: WireFormat) -> dict[int, Dfa]:
    """What each hole of ``envelope`` stands for this turn: the copies from ``sources``
    (strings), or the numbers written in them within the hole's number language."""
    used = [h for h in HOLE_SYMBOLS if (envelope.trans[:, envelope.sym_class[h]] >= 0).any()]
    fills = {h: _copies_dfa(sources, wf, FIXED_HOLE_KINDS[h])  # type: ignore[arg-type]
             for h in used if h in FIXED_HOLE_KINDS}
    numbers: Dfa | None = None
    for h in used:
        if h in FIXED_HOLE_KINDS:
            continue
        kind, language = number_hole_language(h)
        if kind == "string_numbers":  # string content of a pattern, under the numbers rule
            fills[h] = product(language, _copies_dfa(sources, wf, "string_numbers"), "and")
        else:
            numbers = numbers or to_dfa(copied_number_node(sources), wf.n_symbols)
            fills[h] = product(language, numbers, "and")
    return fills


_args_cache: "OrderedDict[str, Any]" = OrderedDict()


def _arguments_dfa(t: ToolSchema, index: int, wf: WireFormat, options: SchemaOptions) -> Any:
    """A tool's arguments as a DFA (one per tool keeps the envelope's NFA small), memoised:
    with the copy constraint the grammar is recompiled at every model step, and only tools
    with copied parameters depend on the conversation's text."""
    if options.copy_sources and not uses_copy(t.parameters):
        options = dataclasses.replace(options, copy_sources=())

    def make() -> Any:
        try:
            # a call's arguments are an object even where the schema leaves the type out
            compiler = SchemaCompiler({**t.parameters, "type": "object"}, wf, options)
            node = compiler.node()  # (a pattern's own blow-up is named there, with its pointer)
            try:
                return to_dfa(node, wf.n_symbols)
            except AutomatonTooLarge as e:
                raise compiler.too_large(e) from None
        except SchemaError as e:  # (of its own class: PatternError, AutomatonTooLarge)
            raise type(e)(f"tool {t.name!r}: {e.message}", keyword=e.keyword,
                          pointer=f"/tools/{index}/parameters{e.pointer}") from None

    return _memoised(_args_cache, [t.parameters, wf.name, wf.source, repr(options)], 256, make)


def clear_caches() -> None:
    """Forget compiled grammars held in memory (the disk cache stays). For benchmarks that
    must pay for a compile each time, as a conversation with new text does. Envelopes
    compiled with holes for copied values stay: no text changes them, so a new
    conversation with the same tools reuses them too."""
    from . import schema

    with _lock:
        _grammar_cache.clear()
        _args_cache.clear()
    schema._copies.clear()


def byte_tokenizer(special_tokens: Sequence[str] = ("<pad>", "<eos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>",
                                                    "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                                    "<tool_response|>", '<|"|>')) -> Any:
    """A tiny byte-level BPE tokenizer (256 bytes + a few merges + Gemma 4's special tokens).

    Built in code, offline; useful for tests and examples. Ids 0.. are the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from .vocabulary import _byte_decoder

    byte_chars = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for c in byte_chars:
        vocab[c] = len(vocab)
    merges = []
    for a, b in [("c", "a"), ("ca", "l"), ("cal", "l"), ("\"", ":"), ("e", "r"), ("t", "h"), ("th", "e")]:
        vocab.setdefault(a + b, len(vocab))
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok
