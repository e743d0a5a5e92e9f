"""How a conversation is spelled for one wire format: turns, tool declarations, calls, results.

The wire format (``grammars/<name>.toml``) is data; this module renders messages with it,
so that the text the model reads and the calls the grammar lets it write use one spelling.
It also parses a model's *unconstrained* text back into calls (what prompt-and-parse
runtimes do; the constrained path parses with the grammar instead).

>>> p = Protocol("gemma4")
>>> p.render_call("get_weather", {"city": "Paris", "days": 3})
'<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
>>> p.parse_output('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>').calls
[ToolCall(name='get_weather', arguments={'city': 'Paris', 'days': 3})]
"""

from __future__ import annotations

import json
import math
import operator
import re
from string import Template
from typing import Any, Mapping, Sequence

from .errors import ParseError, WireFormatError
from .grammar import ParsedOutput, ToolCall
from .grammar.numbers import bound_readings, plain_decimal
from .grammar.wireformat import WireFormat, load_wire_format

#: Keywords that make the grammar spell a number without an exponent (``grammar.numbers``).
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: A piece of conversation text and whether it is encoded literally (user and tool text:
#: special-token strings in it are never control tokens).
Segment = tuple[str, bool]


class Protocol:
    """Renders and parses conversations in one wire format (a name in grammars/ or a .toml path)."""

    def __init__(self, wire_format: str | WireFormat = "gemma4") -> None:
        self.wire_format = wire_format if isinstance(wire_format, WireFormat) else load_wire_format(wire_format)
        wf = self.wire_format
        for key in ("system", "user", "model", "model_end", "declaration", "response"):
            if key not in wf.turns:
                raise WireFormatError(f"wire format {wf.name!r} has no [turns] {key} template ({wf.source})")
        self._v = wf.value

    @property
    def name(self) -> str:
        return self.wire_format.name

    # ---- values ----------------------------------------------------------------------------
    def render_value(self, value: Any, schema: Mapping[str, Any] | None = None) -> str:
        """``value`` in the wire format's spelling; object keys in ``schema``'s property order
        (the order the grammar expects), others after them in their own order."""
        return self._value(value, schema, schema or {}, None)

    def _value(self, v: Any, schema: Mapping[str, Any] | None, root: Mapping[str, Any],
               marks: list[str] | None) -> str:
        vs = self._v
        given = schema
        schema = _resolve(schema, root, v)
        if isinstance(v, dict):
            props = (schema or {}).get("properties", {})
            keys = [k for k in props if k in v] + [k for k in v if k not in props]
            members = []
            for k in keys:
                sub = props.get(k)
                if sub is None and isinstance((schema or {}).get("additionalProperties"), dict):
                    sub = schema["additionalProperties"]  # type: ignore[index]
                members.append(self._key(str(k)) + self._value(v[k], sub, root, marks))
            return vs["object_open"] + vs["member_separator"].join(members) + vs["object_close"]
        if isinstance(v, (list, tuple)):
            items = (schema or {}).get("items")
            prefix = (schema or {}).get("prefixItems", [])
            parts = [self._value(x, prefix[i] if i < len(prefix) else items if isinstance(items, dict) else None, root,
                                 marks) for i, x in enumerate(v)]
            return vs["array_open"] + vs["item_separator"].join(parts) + vs["array_close"]
        if isinstance(v, str):
            return self.render_string(v, marks)
        if isinstance(v, bool) or v is None:
            return json.dumps(v)
        if isinstance(v, float) and math.isinf(v):
            # JSON has no infinity; a number past the double range (1e999) parses to it, so
            # spell it back that way rather than fail on a value the grammar let through.
            return "1e999" if v > 0 else "-1e999"
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("NaN has no JSON spelling")
        if isinstance(v, float) and (_plain_numbers(schema, root) or _plain_numbers(given, root)):
            # an integer or a bounded number is spelled without an exponent (see
            # grammar.numbers): the shortest decimal that reads back as the value
            if v.is_integer():
                return _integer_digits(v, (schema, given), root)
            return plain_decimal(v)
        return json.dumps(v)

    def _key(self, key: str) -> str:
        if self._v.get("key_style") == "identifier" and not _IDENT.match(key):
            raise ValueError(f"key {key!r} cannot be spelled in wire format {self.name!r} (keys must be identifiers)")
        spelled = key if self._v.get("key_style") == "identifier" else json.dumps(key, ensure_ascii=False)[1:-1]
        return Template(self._v["key"]).safe_substitute(key=spelled)

    def render_string(self, s: str, marks: list[str] | None = None) -> str:
        """A string value. Its content is text from the model, a user or a tool: with
        ``marks`` it is set aside (a placeholder stays) so that it can be encoded literally;
        without delimiter escapes (gemma4) a delimiter spelled as text inside it is only
        unambiguous that way."""
        vs = self._v
        body = json.dumps(s, ensure_ascii=False)[1:-1] if vs.get("string_escapes") == "json" else s
        if marks is not None:
            marks.append(body)
            body = f"\x00{len(marks) - 1}\x00"
        return vs["string_open"] + body + vs["string_close"]

    # ---- calls and answers -------------------------------------------------------------------
    def render_call(self, name: str, arguments: Mapping[str, Any], schema: Mapping[str, Any] | None = None,
                    marks: list[str] | None = None) -> str:
        args = self._value(dict(arguments), schema or {"type": "object"}, schema or {}, marks)
        return Template(self.wire_format.calls["call"]).safe_substitute(name=name, arguments=args)

    def render_calls(self, calls: Sequence[ToolCall], schemas: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """One or more calls in the envelope, without the stop token (as text, for reading)."""
        return "".join(t for t, _ in self.calls_segments(calls, schemas))

    def calls_segments(self, calls: Sequence[ToolCall],
                       schemas: Mapping[str, Mapping[str, Any]] | None = None) -> list[Segment]:
        """The calls as (text, literal) pieces: string values are literal, so a `<turn|>` or a
        delimiter the model wrote as text inside an argument stays text when re-encoded."""
        c = self.wire_format.calls
        marks: list[str] = []
        body = c.get("separator", "").join(self.render_call(x.name, x.arguments, (schemas or {}).get(x.name), marks)
                                             for x in calls)
        return _split_marks(c.get("open", "") + body + c.get("close", ""), marks)

    def render_text(self, text: str) -> str:
        """A final answer in the text branch, without the stop token (as text, for reading)."""
        return "".join(t for t, _ in self.text_segments(text))

    def text_segments(self, text: str) -> list[Segment]:
        """A final answer as (text, literal) pieces: the answer itself is literal."""
        t = self.wire_format.text
        marks: list[str] = []
        if t.get("body") == "string":
            body = self.render_string(text, marks)
        else:
            marks.append(text)
            body = "\x000\x00"
        return _split_marks(t.get("open", "") + body + t.get("close", ""), marks)

    @property
    def calls_stop(self) -> str:
        return self._resolve_special(self.wire_format.calls.get("end", "${eos}"))

    @property
    def text_stop(self) -> str:
        return self._resolve_special(self.wire_format.text.get("end", "${eos}"))

    def _resolve_special(self, s: str) -> str:
        return s.replace("${eos}", "<eos>")

    # ---- turns ---------------------------------------------------------------------------------
    def _turn(self, key: str, **fields: str) -> str:
        return Template(self.wire_format.turns.get(key, "")).safe_substitute(**fields)

    def _segments(self, key: str, untrusted: dict[str, str], **fields: str) -> list[Segment]:
        """A template with ``untrusted`` fields kept apart, to be encoded literally."""
        marks = {k: f"\x00{i}\x00" for i, k in enumerate(untrusted)}
        return _split_marks(self._turn(key, **fields, **marks), list(untrusted.values()))

    def user_segments(self, text: str) -> list[Segment]:
        """A user turn as (text, literal) pieces: the user's text is encoded literally."""
        return self._segments("user", {"content": text})

    def response_segments(self, name: str, content: str) -> list[Segment]:
        """A tool result as (text, literal) pieces: the tool's output is encoded literally."""
        if self._v.get("string_escapes") != "json" and self._v["string_close"] in content:
            content = content.replace(self._v["string_close"], "")
        return self._segments("response", {"content": content,
                                           "content_json": json.dumps(content, ensure_ascii=False)}, name=name)

    def after_calls_segments(self, results: Sequence[tuple[str, str]]) -> list[Segment]:
        """What follows a model's calls, for (tool name, result text) pairs."""
        out: list[Segment] = [(self._turn("calls_end"), False)]
        for name, content in results:
            out += self.response_segments(name, content)
        return out + [(self._turn("responses_end"), False)]

    def render_declaration(self, name: str, description: str, parameters: Mapping[str, Any]) -> str:
        """A tool's declaration for the system turn. Extension keywords ("x-copy", any
        "x-...") steer the grammar, not the model, and are left out of what it reads.

        With ``declared_schema = "gemma"`` in the wire format's [turns] the parameters are
        written as Gemma 4's chat template writes them (what its checkpoints read in
        training); otherwise the whole JSON Schema is written in the value spelling."""
        schema = _without_extensions(parameters)
        style = self.wire_format.turns.get("declared_schema", "full")
        if style not in ("full", "gemma"):
            raise WireFormatError(f'[turns] declared_schema must be "full" or "gemma", got {style!r} '
                                  f"({self.wire_format.source})")
        return self._turn("declaration", name=name, description=description,
                          description_json=json.dumps(description, ensure_ascii=False),
                          parameters=self._gemma_parameters(schema) if style == "gemma" else self._declared(schema))

    # Gemma 4's chat template writes a tool's parameters with a fixed set of keys: per
    # property (sorted by name) its description, enum (strings), items (arrays), nullable,
    # properties and required (objects), and its type in capitals, last; every other
    # keyword (bounds, patterns, defaults, additionalProperties) is not shown to the model.
    def _gemma_parameters(self, schema: Mapping[str, Any]) -> str:
        parts = []
        if schema.get("properties"):
            parts.append("properties:{" + self._gemma_properties(schema["properties"]) + "}")
        if schema.get("required"):
            parts.append("required:" + self._gemma_argument(list(schema["required"])))
        parts.append("type:" + self.render_string(str(schema.get("type", "object")).upper()))
        return "{" + ",".join(parts) + "}"

    def _gemma_properties(self, properties: Mapping[str, Any]) -> str:
        out = []
        for key in sorted(properties):
            # (one published version of the template skipped properties named like its own
            # keys, "description" or "type"; a later one writes them, as here)
            value = properties[key] if isinstance(properties[key], Mapping) else {}
            kind = str(value.get("type", "")).upper()
            parts = []
            if value.get("description"):
                parts.append("description:" + self.render_string(str(value["description"])))
            if kind == "STRING" and value.get("enum"):
                parts.append("enum:" + self._gemma_argument(list(value["enum"])))
            if kind == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
                parts.append("items:{" + self._gemma_items(value["items"]) + "}")
            if value.get("nullable"):
                parts.append("nullable:true")
            if kind == "OBJECT" and isinstance(value.get("properties"), Mapping):
                parts.append("properties:{" + self._gemma_properties(value["properties"]) + "}")
            if kind == "OBJECT" and value.get("required"):
                parts.append("required:" + self._gemma_argument(list(value["required"])))
            parts.append("type:" + self.render_string(kind))
            out.append(f"{key}:{{" + ",".join(parts) + "}")
        return ",".join(out)

    def _gemma_items(self, items: Mapping[str, Any]) -> str:
        parts = []
        for key in sorted(items):
            value = items[key]
            if value is None:
                continue
            if key == "properties" and isinstance(value, Mapping):
                parts.append("properties:{" + self._gemma_properties(value) + "}")
            elif key == "required":
                parts.append("required:" + self._gemma_argument(list(value)))
            elif key == "type":
                upper = value.upper() if isinstance(value, str) else [str(v).upper() for v in value]
                parts.append("type:" + self._gemma_argument(upper))
            else:
                parts.append(f"{key}:" + self._gemma_argument(value))
        return ",".join(parts)

    def _gemma_argument(self, value: Any) -> str:
        """A literal as the template writes one: strings delimited, mapping keys sorted
        and delimited too, booleans lower-case, numbers as written."""
        if isinstance(value, str):
            return self.render_string(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, Mapping):
            return "{" + ",".join(self.render_string(str(k)) + ":" + self._gemma_argument(value[k])
                                  for k in sorted(value)) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(self._gemma_argument(v) for v in value) + "]"
        return str(value)

    def _declared(self, schema: Any) -> str:
        """A JSON Schema for the model to read: the value spelling, any key allowed."""
        vs = self._v
        if isinstance(schema, dict):
            key_ident = vs.get("key_style") == "identifier"
            members = [Template(vs["key"]).safe_substitute(
                key=k if key_ident else json.dumps(k, ensure_ascii=False)[1:-1]) + self._declared(x)
                for k, x in schema.items()]
            return vs["object_open"] + vs["member_separator"].join(members) + vs["object_close"]
        if isinstance(schema, list):
            return vs["array_open"] + vs["item_separator"].join(self._declared(x) for x in schema) + vs["array_close"]
        if isinstance(schema, str):
            return self.render_string(schema)
        return json.dumps(schema)

    def system_turn(self, instructions: str, declarations: Sequence[str] = ()) -> str:
        return self._turn("system", content=instructions + "".join(declarations))

    def user_turn(self, text: str) -> str:
        return self._turn("user", content=text)

    @property
    def model_start(self) -> str:
        return self._turn("model")

    @property
    def model_end(self) -> str:
        """What follows a final answer (in gemma4 it starts with the text stop token)."""
        return self._turn("model_end")

    def render_response(self, name: str, content: str) -> str:
        return "".join(t for t, _ in self.response_segments(name, content))

    # ---- parsing unconstrained text ------------------------------------------------------------
    def parse_output(self, text: str) -> ParsedOutput:
        """Parse a model's free text (no grammar) into calls or a final text.

        Lenient about what follows the last call, strict about each call's spelling;
        raises ``ParseError`` for a malformed call (what a prompt-and-parse runtime retries).
        """
        c = self.wire_format.calls
        head, _, tail = c["call"].partition("${name}")
        if head not in text:
            return ParsedOutput(text=self._strip_text(text))
        calls = []
        pos = 0
        body = text
        if c.get("open") and body.lstrip().startswith(c["open"]):
            body = body.lstrip()[len(c["open"]):]
        while True:
            i = body.find(head, pos)
            if i < 0:
                break
            m = re.match(r"[A-Za-z_][A-Za-z0-9_.\-]*", body[i + len(head):])
            if not m:
                raise ParseError(f"a call without a tool name at character {i}")
            name = m.group(0)
            j = i + len(head) + len(name)
            args_tpl, _, after = tail.partition("${arguments}")
            if args_tpl and not body.startswith(args_tpl, j):
                raise ParseError(f"call {name!r}: expected {args_tpl!r} at character {j}")
            j += len(args_tpl)
            value, j = self._parse_value(body, j)
            if not isinstance(value, dict):
                raise ParseError(f"call {name!r}: the arguments are not an object")
            if after and not body.startswith(after, j):
                raise ParseError(f"call {name!r}: expected {after!r} at character {j}")
            calls.append(ToolCall(name, value))
            pos = j + len(after)
        return ParsedOutput(calls=calls)

    def _strip_text(self, text: str) -> str:
        t = self.wire_format.text
        s = text
        if t.get("open") and s.startswith(t["open"]):
            s = s[len(t["open"]):]
            if t.get("close") and s.endswith(t["close"]):
                s = s[: -len(t["close"])]
            if t.get("body") == "string":
                try:
                    v, _ = self._parse_value(s, 0)
                    return str(v)
                except ParseError:
                    return s
        return s

    def _parse_value(self, s: str, i: int) -> tuple[Any, int]:
        vs = self._v
        if s.startswith(vs["object_open"], i):
            i += len(vs["object_open"])
            out: dict[str, Any] = {}
            if s.startswith(vs["object_close"], i):
                return out, i + len(vs["object_close"])
            while True:
                key, i = self._parse_key(s, i)
                out[key], i = self._parse_value(s, i)
                if s.startswith(vs["member_separator"], i):
                    i += len(vs["member_separator"])
                elif s.startswith(vs["object_close"], i):
                    return out, i + len(vs["object_close"])
                else:
                    raise ParseError(f"expected {vs['member_separator']!r} or {vs['object_close']!r} at character {i}")
        if s.startswith(vs["array_open"], i):
            i += len(vs["array_open"])
            items: list[Any] = []
            if s.startswith(vs["array_close"], i):
                return items, i + len(vs["array_close"])
            while True:
                x, i = self._parse_value(s, i)
                items.append(x)
                if s.startswith(vs["item_separator"], i):
                    i += len(vs["item_separator"])
                elif s.startswith(vs["array_close"], i):
                    return items, i + len(vs["array_close"])
                else:
                    raise ParseError(f"expected {vs['item_separator']!r} or {vs['array_close']!r} at character {i}")
        if s.startswith(vs["string_open"], i):
            return self._parse_string(s, i)
        m = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null").match(s, i)
        if not m:
            raise ParseError(f"expected a value at character {i}: {s[i:i + 20]!r}")
        return json.loads(m.group(0)), m.end()

    def _parse_string(self, s: str, i: int) -> tuple[str, int]:
        vs = self._v
        i += len(vs["string_open"])
        if vs.get("string_escapes") == "json":
            try:
                value, end = json.JSONDecoder().raw_decode(s, i - 1)
            except json.JSONDecodeError as e:
                raise ParseError(f"bad string at character {i}: {e.msg}") from None
            return value, end
        j = s.find(vs["string_close"], i)
        if j < 0:
            raise ParseError(f"unterminated string at character {i}")
        return s[i:j], j + len(vs["string_close"])

    def _parse_key(self, s: str, i: int) -> tuple[str, int]:
        before, _, after = self._v["key"].partition("${key}")
        if not s.startswith(before, i):
            raise ParseError(f"expected a key at character {i}")
        i += len(before)
        if self._v.get("key_style") == "identifier":
            m = _IDENT.pattern[:-2]
            mm = re.compile(m).match(s, i)
            if not mm:
                raise ParseError(f"expected a key at character {i}")
            key, i = mm.group(0), mm.end()
        else:
            j = s.find('"', i)
            while j > 0 and s[j - 1] == "\\":
                j = s.find('"', j + 1)
            if j < 0:
                raise ParseError(f"unterminated key at character {i}")
            key, i = json.loads('"' + s[i:j] + '"'), j
        if not s.startswith(after, i):
            raise ParseError(f"expected {after!r} after key {key!r} at character {i}")
        return key, i + len(after)


# Where a JSON Schema holds subschemas: name -> schema maps, lists of schemas, one schema.
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
                  "contains", "propertyNames", "not", "if", "then", "else")


def _without_extensions(schema: Any) -> Any:
    """``schema`` with its "x-..." keywords left out, in every subschema (a property that is
    *named* "x-..." stays: only keywords go)."""
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-"):
            continue
        if key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            value = {name: _without_extensions(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            value = [_without_extensions(sub) for sub in value]
        elif key in _SUBSCHEMA_ONE:
            value = _without_extensions(value)
        out[key] = value
    return out


def _split_marks(text: str, marks: list[str]) -> list[Segment]:
    """Template text with ``\\x00i\\x00`` placeholders -> segments, the marked ones literal."""
    out: list[Segment] = []
    for i, part in enumerate(re.split("\x00(\\d+)\x00", text)):
        if i % 2:
            out.append((marks[int(part)], True))
        elif part:
            out.append((part, False))
    return out


def _plain_numbers(schema: Any, root: Mapping[str, Any]) -> bool:
    """Whether the grammar spells a number under ``schema`` without an exponent: an
    integer type or a numeric bound on it or on an ``allOf`` member (the plain spelling
    is one every number language takes)."""
    if not isinstance(schema, Mapping):
        return False
    types = schema.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types) or _BOUNDS & set(schema):
        return True
    members = schema.get("allOf")
    return isinstance(members, list) and any(_plain_numbers(_follow_ref(m, root), root) for m in members)


def _integer_digits(v: float, schemas: Sequence[Any], root: Mapping[str, Any]) -> str:
    """The digits of an integer-valued float ``v`` as the grammar takes them under
    ``schemas``' bounds. Past 2**53 its shortest decimal (100000000000000000000000 for
    1e23) and its exact value (99999999999999991611392) differ, and a parser reads digits
    as an exact integer, which the grammar takes only within each bound under both of its
    readings (its decimal text and the double it parses to; ``SchemaCompiler.number_node``):
    under "maximum": 1e23 only the exact digits fit, under "maximum": 1e308 only the
    shortest. The shortest is written unless a bound refuses it. No -0 (canonical JSON)."""
    shortest = plain_decimal(v).removesuffix(".0") if v else "0"
    exact = str(int(v))
    if exact == shortest or all(_fits_bounds(int(shortest), s, root) for s in schemas):
        return shortest
    return exact if all(_fits_bounds(int(exact), s, root) for s in schemas) else shortest


def _fits_bounds(n: int, schema: Any, root: Mapping[str, Any]) -> bool:
    """Whether the integer ``n`` meets ``schema``'s numeric bounds (and its ``allOf``
    members') under both readings of each bound."""
    if not isinstance(schema, Mapping):
        return True
    for kw, ok in (("maximum", operator.le), ("exclusiveMaximum", operator.lt),
                   ("minimum", operator.ge), ("exclusiveMinimum", operator.gt)):
        b = schema.get(kw)
        if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b):
            if not all(ok(n, r) for r in bound_readings(b)):
                return False
    members = schema.get("allOf")
    return all(_fits_bounds(n, _follow_ref(m, root), root) for m in members) if isinstance(members, list) else True


def _follow_ref(schema: Any, root: Mapping[str, Any]) -> Any:
    """``schema`` with a local ``$ref`` followed (an ``allOf`` member that names a ``$defs`` entry)."""
    return _resolve(schema, root, None) if isinstance(schema, Mapping) and "$ref" in schema else schema


def _resolve(schema: Mapping[str, Any] | None, root: Mapping[str, Any], value: Any) -> Mapping[str, Any] | None:
    """Follow ``$ref`` and pick the ``anyOf``/``oneOf`` branch whose type fits ``value`` (for key order)."""
    for _ in range(16):
        if not isinstance(schema, Mapping):
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            node: Any = root
            for part in ref[2:].split("/"):
                node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, Mapping) else {}
            schema = node
            continue
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                fit = [b for b in branches if _fits(b, value, root)]
                if fit:
                    schema = fit[0]
                    break
        else:
            return schema
    return schema


def _fits(schema: Any, value: Any, root: Mapping[str, Any]) -> bool:
    if isinstance(schema, Mapping) and "$ref" in schema:
        schema = _resolve(schema, root, value)
    t = schema.get("type") if isinstance(schema, Mapping) else None
    if t is None:
        return True
    types = t if isinstance(t, list) else [t]
    kind = ("object" if isinstance(value, dict) else "array" if isinstance(value, (list, tuple))
            else "string" if isinstance(value, str) else "boolean" if isinstance(value, bool)
            else "null" if value is None else "integer" if isinstance(value, int)
            or (isinstance(value, float) and value.is_integer()) else "number")
    return kind in types or (kind == "integer" and "number" in types)
