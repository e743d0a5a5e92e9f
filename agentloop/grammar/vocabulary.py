"""What each token of a tokenizer spells, as wire-format symbols.

A token is either one special symbol (``<|"|>``, ``<|tool_call>``, the end and pad
tokens) or a run of bytes. The bytes come from the tokenizer's own decoding scheme:
byte-level BPE (GPT-2 style), SentencePiece-style (``▁`` for space, ``<0xNN>`` byte
fallback) or WordPiece (``##`` continuations; a word piece spells its text as is, so
canonical JSON without spaces can be written). Special tokens the wire format does not
use spell nothing and are never allowed.

Example::

    >>> from tokenizers import Tokenizer
    >>> vocab = Vocabulary.from_tokenizer(my_tokenizer, load_wire_format("gemma4"))  # doctest: +SKIP
    >>> vocab.token_symbols[vocab.stop_id]                                             # doctest: +SKIP
    (267,)
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

from ..errors import GrammarInputError, ParseError, VocabularyError
from .wireformat import EOS, PAD, WireFormat

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_DEFAULT_EOS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]", "<|im_end|>")
_DEFAULT_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def backend_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or itself)."""
    if hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        return tokenizer
    if isinstance(tokenizer, (str, bytes, os.PathLike)):
        raise TypeError(
            f"the tokenizer must be a tokenizer object, not a {type(tokenizer).__name__} ({tokenizer!r}): load "
            "it first, e.g. tokenizers.Tokenizer.from_file(path) or transformers.AutoTokenizer.from_pretrained(path)"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError(
            f"{type(tokenizer).__name__} has no fast (tokenizers) backend; load it with use_fast=True "
            "or pass a tokenizers.Tokenizer"
        )
    return backend


_unpadded: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_unpadded_lock = threading.Lock()


def _without_padding(backend: Any) -> Any:
    """``backend``, or where it pads or truncates its encodings (a tokenizer saved for
    embeddings: 128 ids, [PAD] after the text, the rest cut) a copy that does neither
    (made once per tokenizer: the engine and training encode whole texts)."""
    if getattr(backend, "padding", None) is None and getattr(backend, "truncation", None) is None:
        return backend
    size = backend.get_vocab_size(with_added_tokens=True)  # (tokens added since: a new copy)
    with _unpadded_lock:
        try:
            size_then, plain = _unpadded.get(backend, (-1, None))
        except TypeError:  # (not weak-referenceable: a copy per call)
            size_then, plain = -1, None
        if plain is None or size_then != size:
            plain = copy.deepcopy(backend)
            plain.no_padding()
            plain.no_truncation()
            try:
                _unpadded[backend] = (size, plain)
            except TypeError:
                pass
    return plain


def encode_text(tokenizer: Any, text: str, *, literal: bool = False) -> list[int]:
    """Token ids of ``text`` (no BOS). Special-token strings written in it (``<turn|>``) become
    the control tokens, unless ``literal``: then they are spelled as plain text, so text from
    users and tools can never open or close a turn.

    >>> from agentloop.grammar import byte_tokenizer
    >>> t = byte_tokenizer()
    >>> len(encode_text(t, "a<turn|>")), len(encode_text(t, "a<turn|>", literal=True))
    (2, 8)

    The tokenizer's own padding and truncation, if it has any, are not applied.
    """
    backend = _without_padding(backend_tokenizer(tokenizer))
    if not literal:
        return list(backend.encode(text, add_special_tokens=False).ids)
    specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special and t.content]
    hits = [m.start() for m in re.finditer("|".join(map(re.escape, sorted(specials, key=len, reverse=True))), text)] \
        if specials else []
    # Cut each special string after its first character: neither piece spells it any more.
    cuts = [0] + [h + 1 for h in hits] + [len(text)]
    ids: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        if b > a:
            ids += backend.encode(text[a:b], add_special_tokens=False).ids
    return ids


def encode_segments(tokenizer: Any, segments: Iterable[tuple[str, bool]]) -> list[int]:
    """Token ids of (text, literal) pieces, each encoded as :func:`encode_text` would."""
    return [i for text, literal in segments if text for i in encode_text(tokenizer, text, literal=literal)]


def _symbols_in_a_row(token_symbols: Sequence[tuple[int, ...]]) -> tuple["np.ndarray", "np.ndarray"]:
    """(V,) int64 the number of symbols each token spells, and (their sum,) int32 all
    of them, token after token."""
    import numpy as np

    lens = np.fromiter(map(len, token_symbols), np.int64, count=len(token_symbols))
    flat = np.fromiter(itertools.chain.from_iterable(token_symbols), np.int32, count=int(lens.sum()))
    return lens, flat


def _decoder_kind(spec: dict[str, Any]) -> str:
    dec = spec.get("decoder") or {}
    kinds = [d.get("type") for d in dec.get("decoders", [])] if dec.get("type") == "Sequence" else [dec.get("type")]
    model = (spec.get("model") or {}).get("type")
    if "ByteLevel" in kinds:
        return "bytelevel"
    if "WordPiece" in kinds or model == "WordPiece":
        return "wordpiece"
    if "Metaspace" in kinds or "ByteFallback" in kinds or any(
        d.get("type") == "Replace" for d in dec.get("decoders", [])
    ):
        return "sentencepiece"
    return "plain"


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Per-token symbols for one (tokenizer, wire format) pair."""

    #: token id -> symbols it spells; () for tokens that can never be generated
    token_symbols: tuple[tuple[int, ...], ...]
    stop_id: int
    pad_id: int
    wire_format: WireFormat
    #: wire-format special token name -> token id
    special_ids: Mapping[str, int]
    fingerprint: str

    @property
    def size(self) -> int:
        return len(self.token_symbols)

    @cached_property
    def symbol_matrix(self) -> tuple["np.ndarray", "np.ndarray"]:
        """(V, maxlen) int32 symbols padded with -1, and (V,) lengths; built once."""
        import numpy as np

        lens, flat = _symbols_in_a_row(self.token_symbols)
        width = max(int(lens.max()) if self.size else 1, 1)
        mat = np.full((self.size, width), -1, np.int32)
        rows = np.repeat(np.arange(self.size), lens)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        mat[rows, cols] = flat
        return mat, lens

    @cached_property
    def by_first_symbol(self) -> tuple["np.ndarray", "np.ndarray"]:
        """The tokens that spell something, ordered by their first symbol, and where each
        symbol's run starts in that order ((n_symbols + 1,)): the tokens that begin with
        symbol ``s`` are ``order[starts[s]:starts[s + 1]]``."""
        import numpy as np

        mat, lens = self.symbol_matrix
        spelling = np.flatnonzero(lens > 0)
        order = spelling[np.argsort(mat[spelling, 0], kind="stable")].astype(np.int32)
        starts = np.searchsorted(mat[order, 0], np.arange(self.wire_format.n_symbols + 1)).astype(np.int64)
        return order, starts

    def symbols(self, ids: list[int]) -> list[int]:
        """The symbols ``ids`` spell, in order. Raises ``GrammarInputError`` for an id
        outside the vocabulary and ``ParseError`` for a token that spells nothing (a
        special token the wire format does not use, such as ``<bos>``): no canvas of
        the grammar holds one, and skipping it would accept text the automaton refuses."""
        out: list[int] = []
        for n, i in enumerate(ids):
            if not 0 <= i < self.size:
                raise GrammarInputError(f"token id {i} is outside the vocabulary (size {self.size})")
            spelled = self.token_symbols[i]
            if not spelled:
                raise ParseError(f"token {n} (id {i}) spells nothing in wire format {self.wire_format.name!r} "
                                 "(a special token it does not use): no canvas holds it")
            out.extend(spelled)
        return out

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        wire_format: WireFormat,
        *,
        stop_token: str | int | None = None,
        pad_token: str | int | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> "Vocabulary":
        """Map every token of ``tokenizer`` to symbols of ``wire_format``.

        ``aliases`` maps wire-format special tokens onto tokens the tokenizer does have
        (``{'<|"|>': '<unused0>'}`` to test Gemma 4's protocol on a Gemma 3 vocabulary).
        """
        backend = backend_tokenizer(tokenizer)
        # Only the decoder and model type matter; serialising the whole tokenizer (0.9 s at
        # 262k) to read them is waste.
        decoder = backend.decoder
        spec = {
            "decoder": json.loads(decoder.__getstate__()) if decoder is not None else None,
            "model": {"type": type(backend.model).__name__},
        }
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        id_to_tok = [""] * size
        for t, i in vocab.items():
            id_to_tok[i] = t
        specials = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        aliases = dict(aliases or {})
        # (an alias of a token this wire format does not use is left alone: one map serves both formats)
        absent = sorted(name for name, tok in aliases.items()
                        if name in wire_format.special_tokens and tok not in vocab)
        if absent:
            raise VocabularyError(
                f"aliases maps {absent[0]!r} onto {aliases[absent[0]]!r}, which is not in the tokenizer's "
                "vocabulary; pick a token it has (an unused one, such as '<unused0>')")

        def resolve(token: str | int | None, defaults: tuple[str, ...], attr: str, role: str) -> int:
            if isinstance(token, bool):
                raise VocabularyError(f"{role}_token must be a token string or id, got {token!r}")
            if isinstance(token, int):
                if not 0 <= token < size:
                    raise VocabularyError(f"{role}_token id {token} is outside the vocabulary (size {size})")
                return token
            if token is None:
                own = getattr(tokenizer, attr, None)
                if isinstance(own, int):
                    return own
                for d in defaults:
                    if d in vocab:
                        return vocab[d]
                raise VocabularyError(
                    f"cannot tell the tokenizer's {role} token (tried {', '.join(defaults)}); pass {role}_token="
                )
            if token not in vocab:
                raise VocabularyError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
            return vocab[token]

        stop_id = resolve(stop_token, _DEFAULT_EOS, "eos_token_id", "stop")
        try:
            pad_id = resolve(pad_token, _DEFAULT_PAD, "pad_token_id", "pad")
        except VocabularyError:
            if pad_token is not None:  # (one asked for by name or id is there, or an error)
                raise
            pad_id = stop_id  # no pad token: the canvas tail repeats the stop token

        special_ids: dict[str, int] = {}
        missing = []
        for name in wire_format.special_tokens:
            tok = aliases.get(name, name)
            if tok in vocab:
                special_ids[name] = vocab[tok]
            elif name in _DEFAULT_EOS:  # the protocol's end token, spelled otherwise here: the stop token
                special_ids[name] = stop_id
            else:
                missing.append(name)
        if missing:
            raise VocabularyError(
                f"wire format {wire_format.name!r} needs special tokens {', '.join(missing)}, which this tokenizer "
                f"lacks; map them onto unused tokens with aliases={{{missing[0]!r}: '<unused0>', ...}} "
                "or use another wire format"
            )

        for role, i in (("stop", stop_id), ("pad", pad_id)):
            clash = [n for n, j in special_ids.items() if j == i and n not in _DEFAULT_EOS]
            if clash:
                raise VocabularyError(
                    f"the {role} token (id {i}) is also the wire format's {clash[0]}, which canvases must be able "
                    f"to write; pass another {role}_token")
        kind = _decoder_kind(spec)
        byte_dec = _byte_decoder() if kind == "bytelevel" else None
        symbol_of_id: dict[int, int] = {i: wire_format.symbol(n) for n, i in special_ids.items()}
        symbol_of_id[pad_id] = wire_format.symbol(PAD)
        symbol_of_id[stop_id] = wire_format.symbol(EOS)  # wins over a same-named special

        # Every token spelled by the decoder's rule in one comprehension (a loop that also
        # asked each token whether it was special took 0.34 s at 262k tokens, this 0.16);
        # then the special tokens: the wire format's symbols, and nothing for the rest.
        # A token id the vocabulary skips is "" and spells nothing either way.
        out: list[tuple[int, ...]]
        if kind == "bytelevel":
            def spelled(tok: str) -> tuple[int, ...]:
                try:
                    return tuple(byte_dec[c] for c in tok)  # type: ignore[index]
                except KeyError:
                    return tuple(tok.encode("utf-8"))  # an added plain-text token

            out = [spelled(tok) for tok in id_to_tok]
        elif kind == "sentencepiece":
            fallback = _BYTE_FALLBACK.match
            out = [(int(m.group(1), 16),) if (m := fallback(tok)) else tuple(tok.replace("\u2581", " ").encode("utf-8"))
                   for tok in id_to_tok]
        elif kind == "wordpiece":
            out = [tuple((tok[2:] if tok.startswith("##") else tok).encode("utf-8")) for tok in id_to_tok]
        else:
            out = [tuple(tok.encode("utf-8")) for tok in id_to_tok]
        for i in specials:
            out[i] = ()
        for i, symbol in symbol_of_id.items():
            out[i] = (symbol,)
        # The fingerprint (part of the disk cache's key) hashes every token's symbols as
        # two arrays, their counts and all of them in a row: a bytes object per token
        # took ~0.3 s at 262k tokens, in every process that compiled a grammar.
        lens, flat = _symbols_in_a_row(out)
        digest = hashlib.sha256()
        digest.update(wire_format.name.encode())
        digest.update(repr((stop_id, pad_id, sorted(special_ids.items()))).encode())
        digest.update(lens.astype("<i8").tobytes())
        digest.update(flat.astype("<i8").tobytes())
        return cls(tuple(out), stop_id, pad_id, wire_format, special_ids, digest.hexdigest()[:24])
