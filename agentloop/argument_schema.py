"""JSON Schemas of tool arguments that say no more than pydantic accepts.

The grammar writes every value a tool's schema allows, so a schema looser than the tool's
validator turns into calls the tool refuses, whatever the model prefers. Pydantic's own
JSON Schema is looser for several common types, and uses regex lookarounds for one:

- ``HttpUrl`` and the other URLs with allowed schemes: ``format: uri`` allows any scheme;
- ``NaiveDatetime``: ``format: date-time`` (RFC 3339) always carries an offset, which a
  naive datetime refuses, so no value passes;
- ``timedelta``: ``format: duration`` allows numbers past 999,999,999 days or past what
  pydantic's parser holds (``PT4294967296S``);
- ``UUID1`` ... ``UUID8``: ``format: uuid4`` etc. are no JSON Schema formats (annotations,
  any string);
- ``IPvAnyAddress`` and the network / interface types: likewise (``ipvanyaddress``, ...);
- ``dict[int, ...]``: any key, where only integer keys validate;
- ``FiniteFloat`` (``allow_inf_nan=False``): a number such as ``1e400`` reads as infinity;
- a ``date`` with bounds (``Field(gt=date(2020, 1, 1))``): pydantic writes no bound;
- ``Decimal``: its pattern has lookarounds (``(?!^[-+.]*$)``), which the grammar cannot
  compile (the tool could not be defined), and with ``max_digits`` its first branch is not
  anchored at the end, so it allows any number of digits.

:class:`ArgumentsJsonSchema` (a pydantic schema generator) writes these types' schemas
so that every value they allow validates: each a subset of what pydantic accepts, most
of it. Where a subset would leave out what users write or change with the day (the
digits of a ``Decimal`` bounded otherwise than by ``ge=0`` / ``gt=0``, a ``FutureDate``,
datetime bounds, ``Json`` text, ``ByteSize`` units), the schema stays pydantic's, and a
value the tool refuses is fed back to the model as before.

>>> import re, pydantic
>>> naive = pydantic.TypeAdapter(pydantic.NaiveDatetime).json_schema(schema_generator=ArgumentsJsonSchema)
>>> [bool(re.search(naive["pattern"], v)) for v in ("2024-02-29T09:30:00", "2023-02-29T09:30:00", "2024-02-29T09:30Z")]
[True, False, False]
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from .grammar.schema import rewrite_schemas

__all__ = ["ArgumentsJsonSchema", "decimal_pattern"]

_D = "[0-9]"
# Each part's digits are capped so that the largest duration stays inside what pydantic
# (speedate) parses: days in total at most 999,999,999 (6 + 6 + 6 + 8 digits of years,
# months, weeks, days: ~502M days) and the time part at most 2**32 - 1 seconds (5 + 7 + 9
# digits of hours, minutes, seconds: ~1.96e9 s).
DURATION_PATTERN = (f"^P(?:{_D}{{1,6}}Y)?(?:{_D}{{1,6}}M)?(?:{_D}{{1,6}}W)?(?:{_D}{{1,8}}D)?"
                    f"(?:T(?:{_D}{{1,5}}H)?(?:{_D}{{1,7}}M)?(?:{_D}{{1,9}}S)?)?$")

# A datetime without an offset, on the calendar (years 0001-9999, leap days in leap
# years), microseconds at most, as pydantic reads it.
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = ("(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              "|02-(?:0[1-9]|1[0-9]|2[0-8]))")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,6})?"
NAIVE_DATETIME_PATTERN = f"^(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)T{_TIME}$"

_HEX = "[0-9a-fA-F]"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
# A network's host bits are zero (pydantic's networks are strict): the byte-aligned
# prefixes, and an address alone (a network of one host).
_IPV4_NETWORK = (f"^(?:{_IPV4}(?:/32)?|{_OCTET}(?:\\.{_OCTET}){{2}}\\.0/24|{_OCTET}\\.{_OCTET}\\.0\\.0/16"
                 f"|{_OCTET}\\.0\\.0\\.0/8|0\\.0\\.0\\.0/0)$")
_IPV4_INTERFACE = f"^{_IPV4}(?:/(?:3[0-2]|[12]?[0-9]))?$"
_IPV6 = {"format": "ipv6"}  # (the address alone: a network or an interface of one host)

#: pydantic's own formats (annotations in JSON Schema) -> what each allows, checked.
_OWN_FORMATS: dict[str, dict[str, Any]] = {
    "ipvanyaddress": {"anyOf": [{"format": "ipv4"}, _IPV6]},
    "ipv4network": {"pattern": _IPV4_NETWORK},
    "ipv4interface": {"pattern": _IPV4_INTERFACE},
    "ipv6network": _IPV6,
    "ipv6interface": _IPV6,
    "ipvanynetwork": {"anyOf": [{"pattern": _IPV4_NETWORK}, _IPV6]},
    "ipvanyinterface": {"anyOf": [{"pattern": _IPV4_INTERFACE}, _IPV6]},
    **{f"uuid{v}": {"format": "uuid", "pattern": f"^{_HEX}{{8}}-{_HEX}{{4}}-{v}{_HEX}{{3}}-[89abAB]{_HEX}{{3}}-"
                                                  f"{_HEX}{{12}}$"} for v in range(1, 9)},
}

# A URL's authority as WHATWG's parser (pydantic's) takes it: a host name of ASCII
# labels without a double hyphen (no "xn--" label, which IDNA would decode and may refuse)
# whose last label starts with a letter (a numeric one is read as an IPv4 number and may
# be out of range), or a dotted-quad IPv4; a port up to 65535; plain user info.
_LABEL = "[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"
_HOST = f"(?:(?:{_LABEL}\\.)*[A-Za-z](?:[A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)?|{_IPV4})"
_PORT = "(?::(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
_USER = "(?:[A-Za-z0-9._~-]+(?::[A-Za-z0-9._~-]*)?@)?"

_INTEGER_KEY = "^-?(?:0|[1-9][0-9]*)$"
_LARGEST = sys.float_info.max


def decimal_pattern(max_digits: int | None, decimal_places: int | None, lower: str = "any") -> str:
    """A lookaround-free pattern of the decimal strings pydantic's ``Decimal`` takes with
    these limits: an optional sign, digits with an optional point, no exponent; leading
    zeros of the integer part and trailing zeros of the fraction do not count (pydantic
    normalizes them away), every other digit does. ``lower``: "any" value, "zero" (no
    minus sign: ``ge=0``) or "positive" (no minus sign, a non-zero digit: ``gt=0``).

    >>> bool(re.fullmatch(decimal_pattern(5, 2), "-00123.4500"))
    True
    >>> bool(re.fullmatch(decimal_pattern(5, 2), "1234.5"))
    False
    >>> [bool(re.fullmatch(decimal_pattern(5, 2, "positive"), v)) for v in ("0.01", "0.00", "-1")]
    [True, False, False]
    """
    def fraction(cap: int) -> str:  # after integer digits
        return f"\\.{_D}{{0,{cap}}}0*" if cap else "\\.0*"

    def fraction_only(cap: int | None) -> str:  # with no integer digit but zeros
        if lower == "positive":  # a non-zero digit among the first ``cap`` (any with None)
            if cap is None:
                return f"0*\\.0*[1-9]{_D}*"
            nonzero = "|".join(f"0{{{j}}}[1-9]{_D}{{0,{cap - 1 - j}}}" for j in range(cap))
            return f"0*\\.(?:{nonzero})0*" if cap else ""
        if cap is None:
            return f"\\.{_D}+"
        return "0*\\." + (f"{_D}{{1,{cap}}}0*" if cap else "0+")

    zeros = lower != "positive"  # (a zero integer part before an optional fraction)
    if max_digits is None:
        tail = f"(?:\\.{_D}*)?" if decimal_places is None else f"(?:{fraction(decimal_places)})?"
        forms = [f"{_D}+{tail}" if zeros else f"0*[1-9]{_D}*{tail}", fraction_only(decimal_places)]
    else:
        places = max_digits if decimal_places is None else min(decimal_places, max_digits)
        whole = max_digits if decimal_places is None else max(0, max_digits - decimal_places)
        # (with no whole digit allowed, pydantic counts a zero integer part as one: "0" is
        # refused, "0.0" taken)
        forms = [fraction_only(places)] + ([f"0+(?:{fraction(places)})?"] if whole and zeros else [])
        for k in range(1, whole + 1):  # k significant integer digits leave max_digits - k to the fraction
            lead = "0*[1-9]" + (f"{_D}{{{k - 1}}}" if k > 1 else "")
            forms.append(f"{lead}(?:{fraction(min(max_digits - k, places))})?")
    sign = {"any": "[+-]?", "zero": "\\+?", "positive": "\\+?"}[lower]
    return f"^{sign}(?:{'|'.join(f for f in forms if f)})$"


class ArgumentsJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema generator with the types above made as tight as their
    validators (validation mode; serialization schemas are pydantic's own).

    >>> import re, pydantic
    >>> url = pydantic.TypeAdapter(pydantic.HttpUrl).json_schema(schema_generator=ArgumentsJsonSchema)
    >>> [bool(re.search(url["pattern"], u)) for u in ("https://example.com/a?b", "ftp://example.com", "http://")]
    [True, False, False]
    """

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        json_schema = super().generate(schema, mode)
        return _checked_formats(json_schema) if mode == "validation" else json_schema

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        json_schema = super().float_schema(schema)
        if self.mode == "validation" and schema.get("allow_inf_nan") is False:
            _finite(json_schema)
        return json_schema

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        if self.mode != "validation":
            return super().decimal_schema(schema)
        max_digits, places = schema.get("max_digits"), schema.get("decimal_places")
        bounds = {k: float(schema[k]) for k in ("le", "ge", "lt", "gt", "multiple_of")  # type: ignore[literal-required]
                  if schema.get(k) is not None}
        number = self.float_schema(core_schema.float_schema(allow_inf_nan=False, **bounds))
        if max_digits is None and places is None:
            return number if bounds else {"anyOf": [number, {"type": "string", "pattern": decimal_pattern(None, None)}]}
        # A pattern says a lower bound of zero (the sign), a number no digit limit: other
        # bounds with digit limits keep the number, and pydantic checks the digits.
        lower = {(): "any", (("ge", 0.0),): "zero", (("gt", 0.0),): "positive"}.get(tuple(bounds.items()))
        if lower is None:
            return number
        return {"type": "string", "pattern": decimal_pattern(max_digits, places, lower)}

    def date_schema(self, schema: core_schema.DateSchema) -> JsonSchemaValue:
        json_schema = super().date_schema(schema)
        if self.mode == "validation":  # (ISO dates compare as their texts do)
            bounds = [_date_pattern(schema[op].isoformat(), op)  # type: ignore[literal-required]
                      for op in ("gt", "ge", "lt", "le") if schema.get(op) is not None]
            if len(bounds) == 1:
                json_schema["pattern"] = bounds[0]
            elif bounds:
                json_schema["allOf"] = [{"pattern": b} for b in bounds]
        return json_schema

    def datetime_schema(self, schema: core_schema.DatetimeSchema) -> JsonSchemaValue:
        if self.mode == "validation" and schema.get("tz_constraint") == "naive":
            return {"type": "string", "pattern": NAIVE_DATETIME_PATTERN}
        return super().datetime_schema(schema)

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> JsonSchemaValue:
        json_schema = super().timedelta_schema(schema)
        if self.mode == "validation" and json_schema.get("format") == "duration":
            json_schema["pattern"] = DURATION_PATTERN
        return json_schema

    def url_schema(self, schema: core_schema.UrlSchema) -> JsonSchemaValue:
        return _with_schemes(super().url_schema(schema), schema.get("allowed_schemes"), self.mode)

    def multi_host_url_schema(self, schema: core_schema.MultiHostUrlSchema) -> JsonSchemaValue:
        return _with_schemes(super().multi_host_url_schema(schema), schema.get("allowed_schemes"), self.mode,
                             hosts=2)

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        json_schema = super().dict_schema(schema)
        keys = schema.get("keys_schema")
        # (keys with bounds keep pydantic's schema: a pattern would have to say the bounds)
        if self.mode == "validation" and keys is not None and keys.get("type") == "int" \
                and not any(k in keys for k in ("gt", "ge", "lt", "le", "multiple_of")) \
                and "propertyNames" not in json_schema and "patternProperties" not in json_schema:
            json_schema["propertyNames"] = {"pattern": _INTEGER_KEY}
        return json_schema


def _finite(json_schema: dict[str, Any]) -> None:
    """Bound a number to the doubles (unless bounded already on that side)."""
    if "maximum" not in json_schema and "exclusiveMaximum" not in json_schema:
        json_schema["maximum"] = _LARGEST
    if "minimum" not in json_schema and "exclusiveMinimum" not in json_schema:
        json_schema["minimum"] = -_LARGEST


def _date_pattern(bound: str, op: str) -> str:
    """ISO dates (YYYY-MM-DD, a fixed width) ``op`` ``bound``, compared digit by digit:
    equal up to some digit, then a greater (gt, ge) or smaller (lt, le) one, any after.

    >>> bool(re.search(_date_pattern("2020-01-01", "gt"), "2019-12-31"))
    False
    """
    above = op in ("gt", "ge")
    forms = [] if op in ("gt", "lt") else [bound]
    for i, c in enumerate(bound):
        if c.isdigit() and (c < "9" if above else c > "0"):
            d = int(c)
            step = f"[{d + 1}-9]" if above else f"[0-{d - 1}]"
            forms.append(f"{bound[:i]}{step}[0-9-]{{{len(bound) - i - 1}}}")
    return f"^(?:{'|'.join(forms)})$"


def _with_schemes(json_schema: JsonSchemaValue, schemes: list[str] | None, mode: JsonSchemaMode,
                  hosts: int = 1) -> JsonSchemaValue:
    """A URL with allowed schemes starts with one of them and an authority pydantic
    takes (``hosts`` > 1: a comma-separated list of hosts, as in a database DSN); a
    ``file`` URL may have no host."""
    if mode == "validation" and schemes and "pattern" not in json_schema:
        host_port = f"{_HOST}{_PORT}"
        authority = _USER + (host_port if hosts == 1 else f"{host_port}(?:,{host_port})*")
        web = [re.escape(s) for s in sorted(schemes) if s != "file"]
        forms = [f"(?:{'|'.join(web)})://{authority}"] if web else []
        if "file" in schemes:
            forms.append(f"file://(?:{_HOST})?")
        json_schema["pattern"] = f"^(?:{'|'.join(forms)})(?:[/?#][\\s\\S]*)?$"
    return json_schema


def _checked_formats(schema: Any) -> Any:
    """Replace pydantic's own formats, in every subschema, by what they allow."""
    return rewrite_schemas(schema, _own_format_checked)


def _own_format_checked(schema: dict[str, Any]) -> dict[str, Any]:
    own = _OWN_FORMATS.get(schema["format"]) if isinstance(schema.get("format"), str) else None
    if own is None:
        return schema
    return {**{k: v for k, v in schema.items() if k != "format"}, **copy.deepcopy(own)}
