"""Wire formats: how one model family spells calls, keys, strings, separators and stops.

A wire format is data (``grammars/<name>.toml``); this module loads it and turns it into
symbol sequences and expression nodes. Symbols: bytes 0..255, then the format's special
tokens, then ``${eos}`` and ``${pad}`` (the tokenizer's own end and pad tokens).

Example::

    >>> wf = load_wire_format("gemma4")
    >>> wf.spell_value({"city": "Paris", "days": 3})[:7] == list(b"{city:") + [wf.symbol('<|"|>')]
    True
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ParseError, WireFormatError
from . import charset as cs
from . import numbers
from .fsa import Node, alt, literal, seq

EOS = "${eos}"
PAD = "${pad}"

_GRAMMAR_DIRS = [
    Path(__file__).resolve().parents[2] / "grammars",  # source checkout / editable install
    Path(__file__).resolve().parent / "wire_formats",  # installed wheel
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")

_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_escape(ch: str) -> str | None:
    if ch in _JSON_ESCAPES:
        return _JSON_ESCAPES[ch]
    if ord(ch) < 0x20:
        return f"\\u{ord(ch):04x}"
    return None


_JSON_ESCAPED_SET: cs.CharSet = cs.union(((0, 0x1F),), cs.of_chars('"\\'))


def available_wire_formats() -> list[str]:
    names: set[str] = set()
    for d in _GRAMMAR_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


@dataclass(frozen=True)
class WireFormat:
    """A loaded wire format. Build with :func:`load_wire_format`."""

    name: str
    special_tokens: tuple[str, ...]
    stop_tokens: tuple[str, ...]
    value: dict[str, str]
    calls: dict[str, str]
    text: dict[str, str]
    turns: dict[str, str]
    source: str
    #: the file's text, part of compiled-grammar cache keys (an edit invalidates them)
    file_text: str = ""

    # ---- symbols -------------------------------------------------------------------
    @property
    def symbol_names(self) -> tuple[str, ...]:
        """Names of the non-byte symbols, in symbol order (256, 257, ...)."""
        return self.special_tokens + (EOS, PAD)

    @property
    def n_symbols(self) -> int:
        return 256 + len(self.symbol_names)

    def symbol(self, name: str) -> int:
        try:
            return 256 + self.symbol_names.index(name)
        except ValueError:
            raise WireFormatError(
                f"wire format {self.name!r} has no special token {name!r}; "
                f"declare it in special_tokens of {self.source}"
            ) from None

    def symbol_name(self, symbol: int) -> str:
        return self.symbol_names[symbol - 256]

    def text_symbols(self, text: str) -> list[int]:
        """Spell template text: special tokens become one symbol, the rest UTF-8 bytes."""
        out: list[int] = []
        names = sorted(self.symbol_names, key=len, reverse=True)
        i = 0
        while i < len(text):
            for n in names:
                if text.startswith(n, i):
                    out.append(self.symbol(n))
                    i += len(n)
                    break
            else:
                out.extend(text[i].encode("utf-8"))
                i += 1
        return out

    def symbols_text(self, symbols: list[int]) -> str:
        """The text ``symbols`` spell, for messages: bytes decoded (a cut character
        replaced), special symbols by name (``text_symbols``' inverse)."""
        out, run = [], bytearray()
        for s in symbols:
            if s < 256:
                run.append(s)
                continue
            out.append(run.decode("utf-8", "replace") + self.symbol_name(s))
            run.clear()
        return "".join(out) + run.decode("utf-8", "replace")

    def template(self, text: str) -> list[str | list[int]]:
        """Split a template into literal symbol runs and ``${placeholder}`` names."""
        parts: list[str | list[int]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                parts.append(self.text_symbols(text[pos : m.start()]))
            if m.group(1) in ("eos", "pad"):
                parts.append([self.symbol(m.group(0))])
            else:
                parts.append(m.group(1))
            pos = m.end()
        if pos < len(text):
            parts.append(self.text_symbols(text[pos:]))
        return parts

    def lit(self, field: str, section: str = "value") -> list[int]:
        table = {"value": self.value, "calls": self.calls, "text": self.text}[section]
        out: list[int] = []
        for part in self.template(table.get(field, "")):
            if isinstance(part, str):
                raise WireFormatError(f"{self.source}: [{section}].{field} cannot use ${{{part}}}")
            out.extend(part)
        return out

    # ---- string content --------------------------------------------------------------
    @property
    def escapes(self) -> str:
        return self.value.get("string_escapes", "none")

    def spell_char(self, chars: cs.CharSet) -> Node:
        """Node spelling one character of ``chars`` inside a string, escaped as this format does."""
        if self.escapes == "none":
            return cs.utf8_node(chars)
        plain = cs.minus(chars, _JSON_ESCAPED_SET)
        special = cs.intersect(chars, _JSON_ESCAPED_SET)
        branches = [cs.utf8_node(plain)] if plain else []
        for lo, hi in special:
            for cp in range(lo, hi + 1):
                branches.append(literal(_json_escape(chr(cp)).encode()))  # type: ignore[union-attr]
        return alt(*branches)

    def spell_string_content(self, s: str) -> list[int]:
        if self.escapes == "none":
            return list(s.encode("utf-8"))
        return list("".join(_json_escape(c) or c for c in s).encode("utf-8"))

    def string_node(self, content: Node) -> Node:
        return seq(literal(self.lit("string_open")), content, literal(self.lit("string_close")))

    def key_symbols(self, key: str, pointer: str = "") -> list[int]:
        from ..errors import SchemaError

        if self.value.get("key_style") == "identifier":
            if not _IDENTIFIER.match(key):
                raise SchemaError(
                    f"property name {key!r} cannot be spelled as an unquoted {self.name} key "
                    "(it must match [A-Za-z_][A-Za-z0-9_]*)",
                    keyword="properties",
                    pointer=pointer,
                )
            content = list(key.encode())
        else:
            content = self.spell_string_content(key)
        out: list[int] = []
        for part in self.template(self.value["key"]):
            out.extend(content if part == "key" else part)  # type: ignore[arg-type]
        return out

    def any_key_node(self) -> Node:
        """Any key spelling (for additional properties)."""
        from .fsa import rep

        if self.value.get("key_style") == "identifier":
            first = cs.utf8_node(cs.normalize([(65, 90), (97, 122), (95, 95)]))
            rest = cs.utf8_node(cs.normalize([(48, 57), (65, 90), (97, 122), (95, 95)]))
            content: Node = seq(first, rep(rest))
        else:
            content = rep(self.spell_char(cs.ANY))
        parts: list[Node] = []
        for part in self.template(self.value["key"]):
            parts.append(content if part == "key" else literal(part))  # type: ignore[arg-type]
        return seq(*parts)

    # ---- canonical spelling of values ---------------------------------------------
    def spell_number(self, v: int | float) -> list[int]:
        if isinstance(v, bool):
            raise TypeError("bool is not a number")
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{v} has no JSON spelling")
            if v.is_integer() and abs(v) < 1e16:
                return list(str(int(v)).encode())
            return list(json.dumps(v).encode())
        return list(str(v).encode())

    def number_spellings(self, v: int | float) -> list[list[int]]:
        """Every spelling of the number ``v`` a grammar may use: ``spell_number``'s
        (JSON's shortest, with an exponent for a large or small float), the integer's
        digits for a float with an integer value, and the decimal without an exponent
        (bounded numbers and integers are spelled so: ``0.0000001``, not ``1e-07``).

        >>> [bytes(s).decode() for s in load_wire_format("json").number_spellings(1e-07)]
        ['1e-07', '0.0000001']
        """
        if isinstance(v, float) and math.isinf(v):
            # (no double: a spelling past the double range, which an unbounded number
            # allows and a parser reads as inf, as ``Protocol`` spells it back)
            return [list(b"1e999" if v > 0 else b"-1e999")]
        out = [self.spell_number(v)]
        if isinstance(v, float):
            # (a float with an integer value: its exact digits, and the shortest decimal
            # that reads back as it, which a bound like 1e308 on its decimal reading takes)
            for plain in ([str(int(v))] if v.is_integer() else []) + [numbers.plain_decimal(v)]:
                if list(plain.encode()) not in out:
                    out.append(list(plain.encode()))
        return out

    def spell_value(self, v: Any, key_order: Sequence[str] | None = None) -> list[int]:
        """Canonical spelling of a JSON value (dict keys in their own order)."""
        if v is None:
            return list(b"null")
        if v is True:
            return list(b"true")
        if v is False:
            return list(b"false")
        if isinstance(v, (int, float)):
            return self.spell_number(v)
        if isinstance(v, str):
            return self.lit("string_open") + self.spell_string_content(v) + self.lit("string_close")
        if isinstance(v, list):
            out = self.lit("array_open")
            for i, item in enumerate(v):
                if i:
                    out += self.lit("item_separator")
                out += self.spell_value(item)
            return out + self.lit("array_close")
        if isinstance(v, dict):
            out = self.lit("object_open")
            for i, k in enumerate(key_order if key_order is not None else v.keys()):
                if i:
                    out += self.lit("member_separator")
                out += self.key_symbols(k) + self.spell_value(v[k])
            return out + self.lit("object_close")
        raise TypeError(f"{type(v).__name__} is not a JSON value")

    # ---- parsing symbol sequences back into values -----------------------------------
    def parse_value(self, syms: Sequence[int], pos: int = 0) -> tuple[Any, int]:
        return _ValueParser(self, syms).value(pos)


class _ValueParser:
    def __init__(self, wf: WireFormat, syms: Sequence[int]) -> None:
        self.wf = wf
        self.s = list(syms)
        v = wf.value
        self.obj_open = wf.lit("object_open")
        self.obj_close = wf.lit("object_close")
        self.arr_open = wf.lit("array_open")
        self.arr_close = wf.lit("array_close")
        self.msep = wf.lit("member_separator")
        self.isep = wf.lit("item_separator")
        self.str_open = wf.lit("string_open")
        self.str_close = wf.lit("string_close")
        self.key_tpl = wf.template(v["key"])

    def at(self, pos: int, lit: list[int]) -> bool:
        return bool(lit) and self.s[pos : pos + len(lit)] == lit

    def expect(self, pos: int, lit: list[int], what: str) -> int:
        if not self.at(pos, lit) and lit:
            raise ParseError(f"expected {what} at symbol {pos}")
        return pos + len(lit)

    def value(self, pos: int) -> tuple[Any, int]:
        if self.at(pos, self.obj_open):
            return self.object(pos + len(self.obj_open))
        if self.at(pos, self.arr_open):
            return self.array(pos + len(self.arr_open))
        if self.at(pos, self.str_open):
            return self.string(pos + len(self.str_open))
        for word, val in ((b"null", None), (b"true", True), (b"false", False)):
            if self.s[pos : pos + len(word)] == list(word):
                return val, pos + len(word)
        end = pos
        while end < len(self.s) and self.s[end] < 256 and chr(self.s[end]) in "-+.eE0123456789":
            end += 1
        if end == pos:
            raise ParseError(f"expected a value at symbol {pos}")
        text = bytes(self.s[pos:end]).decode()
        try:
            num: Any = int(text) if re.fullmatch(r"-?\d+", text) else float(text)
        except ValueError:
            raise ParseError(f"malformed number {text!r} at symbol {pos}") from None
        return num, end

    def string(self, pos: int) -> tuple[str, int]:
        text, end = self.string_content(pos)
        return text, end + len(self.str_close)

    def string_content(self, pos: int) -> tuple[str, int]:
        """Decode string content from ``pos`` up to (not past) the closing delimiter."""
        close = self.str_close
        end = pos
        while end < len(self.s) and not self.at(end, close):
            if self.s[end] >= 256:
                raise ParseError(f"special token inside a string at symbol {end}")
            # In JSON a backslash escapes the next symbol (which may be the delimiter).
            end += 2 if (self.s[end] == 0x5C and self.wf.escapes == "json") else 1
        if end >= len(self.s):
            raise ParseError(f"unterminated string starting at symbol {pos}")
        raw = bytes(self.s[pos:end])
        try:
            if self.wf.escapes == "none":
                return raw.decode("utf-8"), end
            return json.loads(b'"' + raw + b'"'), end
        except (ValueError, UnicodeDecodeError) as e:
            raise ParseError(f"malformed string at symbol {pos}: {e}") from None

    def array(self, pos: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        if self.at(pos, self.arr_close):
            return out, pos + len(self.arr_close)
        while True:
            v, pos = self.value(pos)
            out.append(v)
            if self.at(pos, self.isep):
                pos += len(self.isep)
                continue
            return out, self.expect(pos, self.arr_close, "array close")

    def key(self, pos: int) -> tuple[str, int]:
        name = ""
        for part in self.key_tpl:
            if part != "key":
                pos = self.expect(pos, part, "a key")  # type: ignore[arg-type]
            elif self.wf.value.get("key_style") == "identifier":
                end = pos
                while end < len(self.s) and self.s[end] < 128 and (chr(self.s[end]).isalnum() or self.s[end] == 95):
                    end += 1
                name, pos = bytes(self.s[pos:end]).decode(), end
            else:
                name, pos = self.string_content(pos)
        return name, pos

    def object(self, pos: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        if self.at(pos, self.obj_close):
            return out, pos + len(self.obj_close)
        while True:
            k, pos = self.key(pos)
            v, pos = self.value(pos)
            out[k] = v
            if self.at(pos, self.msep):
                pos += len(self.msep)
                continue
            return out, self.expect(pos, self.obj_close, "object close")


def load_wire_format(name_or_path: str | Path = "gemma4") -> WireFormat:
    """Load ``grammars/<name>.toml`` (or a path to such a file)."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        for d in _GRAMMAR_DIRS:
            if (d / f"{name_or_path}.toml").is_file():
                path = d / f"{name_or_path}.toml"
                break
        else:
            raise WireFormatError(
                f"unknown wire format {str(name_or_path)!r}; available: {', '.join(available_wire_formats())}"
            )
    try:
        file_text = path.read_text("utf-8")
        data = tomllib.loads(file_text)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise WireFormatError(f"cannot read wire format {path}: {e}") from None
    for section in ("value", "calls", "text"):
        if section not in data:
            raise WireFormatError(f"{path}: missing [{section}] section")
    for key in ("object_open", "object_close", "key", "member_separator", "array_open", "array_close",
                "item_separator", "string_open", "string_close", "end"):
        if key not in data["value"]:
            raise WireFormatError(f"{path}: [value] needs {key!r}")
    if data["value"].get("string_escapes", "none") not in ("none", "json"):
        raise WireFormatError(f"{path}: [value].string_escapes must be 'none' or 'json'")
    if "call" not in data["calls"] or "end" not in data["calls"]:
        raise WireFormatError(f"{path}: [calls] needs 'call' and 'end'")
    return WireFormat(
        name=data.get("name", path.stem),
        special_tokens=tuple(data.get("special_tokens", [])),
        stop_tokens=tuple(data.get("stop_tokens", [])),
        value=dict(data["value"]),
        calls=dict(data["calls"]),
        text=dict(data["text"]),
        turns=dict(data.get("turns", {})),
        source=str(path),
        file_text=file_text,
    )
