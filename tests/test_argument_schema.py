"""Tools with pydantic types whose validation is narrower than pydantic's JSON Schema
(agentloop/argument_schema.py): every call the grammar lets the model write reaches the
function, and the values users write are still allowed."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import random
import re
import uuid
from typing import Annotated, Any

import pydantic
import pytest
import torch
from pydantic import Field

from agentloop.argument_schema import DURATION_PATTERN, ArgumentsJsonSchema, decimal_pattern
from agentloop.grammar import compile_tools
from agentloop.tools import Tool, tool
from conftest import calls_under_random_logits


def http(url: pydantic.HttpUrl, socket: pydantic.WebsocketUrl, file: pydantic.FileUrl) -> str:
    return ""


def dsn(db: pydantic.PostgresDsn) -> str:
    return ""


def naive(at: pydantic.NaiveDatetime, aware: pydantic.AwareDatetime) -> str:
    return ""


def duration(wait: dt.timedelta) -> str:
    return ""


def uuids(a: pydantic.UUID1, b: pydantic.UUID4, c: pydantic.UUID7) -> str:
    return ""


def addresses(a: pydantic.IPvAnyAddress, net: ipaddress.IPv4Network, iface: ipaddress.IPv4Interface,
              any_net: pydantic.IPvAnyNetwork) -> str:
    return ""


def keyed(counts: dict[int, str]) -> str:
    return ""


def finite(x: pydantic.FiniteFloat) -> str:
    return ""


def decimals(price: decimal.Decimal, cents: Annotated[decimal.Decimal, Field(max_digits=5, decimal_places=2)],
             rate: Annotated[decimal.Decimal, Field(max_digits=3, decimal_places=3)],
             bounded: Annotated[decimal.Decimal, Field(ge=0, le=100)],
             fee: Annotated[decimal.Decimal, Field(gt=0, max_digits=7, decimal_places=2)] = decimal.Decimal(1)) -> str:
    return ""


def dated(after: Annotated[dt.date, Field(gt=dt.date(2020, 1, 1))],
          within: Annotated[dt.date, Field(ge=dt.date(2024, 3, 10), le=dt.date(2024, 12, 31))]) -> str:
    return ""


class Booking(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    day: dt.date
    ref: uuid.UUID
    guests: int


def strict(booking: Booking) -> str:
    return ""


TOOLS = [http, dsn, naive, duration, uuids, addresses, keyed, finite, decimals, dated, strict]


@pytest.mark.parametrize("wire_format", ["gemma4", "json"])
@pytest.mark.parametrize("function", TOOLS, ids=lambda f: f.__name__)
def test_every_call_the_grammar_allows_validates(btok, function, wire_format):
    """Random logits make the model prefer anything (long odd strings, huge numbers):
    whatever canvas the grammar lets through, pydantic takes its arguments. With
    pydantic's own schemas, 100% of these calls were refused for the URLs, naive
    datetimes, durations, versioned UUIDs, networks and int keys, ~20% for the date
    bounds, and all of the strict model's as Python values (an ISO string is no date
    there; ``Tool.validate`` reads arguments as JSON); ``Decimal`` could not be
    defined."""
    t = tool(function)
    g = compile_tools([t.tool_schema], btok, wire_format, allow_text=False)
    gen = torch.Generator().manual_seed(len(function.__name__))
    calls = 0
    for call in calls_under_random_logits(g, gen, (0.5, 2.0, 6.0, 2.0), 160):
        calls += 1
        try:
            t.validate(call.arguments)
        except pydantic.ValidationError as e:
            raise AssertionError(f"{call.arguments!r} refused: {e}") from None
    assert calls >= 12


def _accepts(t: Tool, btok: Any, **arguments: Any) -> bool:
    g = compile_tools([t.tool_schema], btok, "json", allow_text=False)
    return g.accepts_json([{"name": t.name, "arguments": arguments}])


@pytest.mark.parametrize(("function", "good", "refused"), [
    (http, {"url": "https://example.com:8080/a?b=1#c", "socket": "wss://user:pw@chat.example.org/",
            "file": "file:///tmp/x.txt"},
     {"url": "ftp://example.com/"}),
    (http, {"url": "http://10.0.0.1/", "socket": "ws://localhost", "file": "file://server/share"},
     {"url": "http://"}),  # (no host: pydantic refuses, RFC 3986 allows)
    (dsn, {"db": "postgres://app:secret@db1:5432,db2:5433/orders"}, {"db": "mysql://db/orders"}),
    (naive, {"at": "2024-02-29T12:30:00.25", "aware": "2024-02-29T12:30:00+01:00"},
     {"at": "2024-02-29T12:30:00Z"}),  # (RFC 3339 needs the offset that a naive datetime refuses)
    (naive, {"at": "2000-02-29T00:00:00", "aware": "2023-12-31T23:59:59Z"}, {"at": "1900-02-29T00:00:00"}),
    (duration, {"wait": "P1Y2M3DT4H5M6S"}, {"wait": "PT4294967296S"}),
    (duration, {"wait": "P2W"}, {"wait": "P9999999Y"}),
    (uuids, {"a": "c232ab00-9414-11ec-b3c8-9f6bdeced846", "b": "16fd2706-8baf-433b-82eb-8c7fada847da",
             "c": "018f6d6e-3b7a-7cc4-a1f2-0c9a1e1c5b11"},
     {"b": "c232ab00-9414-11ec-b3c8-9f6bdeced846"}),  # a version-1 UUID where version 4 is declared
    (addresses, {"a": "2001:db8::1", "net": "10.0.0.0/8", "iface": "192.168.1.7/24", "any_net": "192.168.0.0/16"},
     {"net": "192.168.1.7/24"}),  # (host bits set: pydantic's networks are strict)
    (keyed, {"counts": {"1": "a", "-20": "b"}}, {"counts": {"one": "a"}}),
    (finite, {"x": -2.5e300}, {"x": 1e400}),
    (decimals, {"price": "19.99", "cents": "-123.45", "rate": "0.125", "bounded": 99.5},
     {"cents": "1234.5"}),
    (decimals, {"price": 19.99, "cents": "0.50", "rate": ".5", "bounded": 0}, {"bounded": 101}),
    (decimals, {"price": "1", "cents": "1", "rate": "0.1", "bounded": 1, "fee": "0.01"}, {"fee": "0.00"}),
    (decimals, {"price": "1", "cents": "1", "rate": "0.1", "bounded": 1, "fee": "12345.67"}, {"fee": 1.234}),
    (dated, {"after": "2020-01-02", "within": "2024-03-10"}, {"after": "2020-01-01"}),
    (dated, {"after": "9999-12-31", "within": "2024-12-31"}, {"within": "2025-01-01"}),
])
def test_the_values_users_write_are_allowed_and_refused_ones_are_not(btok, function, good, refused):
    """Each tightened schema still allows the ordinary spellings of its type, and no
    longer allows a value pydantic refuses (which pydantic's own schema allowed)."""
    t = tool(function)
    t.validate(good)
    assert _accepts(t, btok, **good)
    bad = {**good, **refused}
    with pytest.raises(pydantic.ValidationError):
        t.validate(bad)
    assert not _accepts(t, btok, **bad)


def test_pydantic_schemas_alone_let_refused_values_through(btok):
    """Why the tightening exists: pydantic's own schemas compile to grammars that write
    values its validators refuse (or, for ``Decimal``, do not compile)."""
    adapter = pydantic.TypeAdapter(pydantic.AnyHttpUrl)
    loose = {"type": "object", "properties": {"url": adapter.json_schema()}, "required": ["url"]}
    g = compile_tools([{"name": "fetch", "parameters": loose}], btok, "json", allow_text=False)
    assert g.accepts_json([{"name": "fetch", "arguments": {"url": "ftp://example.com/"}}])
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python("ftp://example.com/")
    assert "(?!" in pydantic.TypeAdapter(decimal.Decimal).json_schema()["anyOf"][1]["pattern"]


class Labels(pydantic.BaseModel):
    format: pydantic.UUID4  # (a property named like the keyword)
    extra: dict = Field(default={"format": "uuid4"})  # (a value that looks like a schema)


def test_only_schemas_are_rewritten():
    schema = Labels.model_json_schema(schema_generator=ArgumentsJsonSchema)
    assert schema["properties"]["format"]["format"] == "uuid" and "pattern" in schema["properties"]["format"]
    assert schema["properties"]["extra"]["default"] == {"format": "uuid4"}


LIMITS = [(None, None), (None, 0), (None, 2), (5, 2), (3, 0), (2, 3), (4, None), (1, 1), (3, 3), (7, 1)]
LOWER = {"any": {}, "zero": {"ge": 0}, "positive": {"gt": 0}}


@pytest.mark.parametrize("lower", LOWER)
@pytest.mark.parametrize(("max_digits", "places"), LIMITS)
def test_decimal_pattern_is_exactly_pydantics_plain_decimals(max_digits, places, lower):
    """Over random strings of digits, points and signs, the pattern takes exactly what
    pydantic's ``Decimal`` with these limits (and lower bound) takes: no string it
    refuses, none it takes left out but a negative zero ("-0.0" >= 0, which the pattern
    for ``ge=0`` leaves out with every minus sign)."""
    rng = random.Random(7)
    strings = {"".join(rng.choice("0000123456789..+-") for _ in range(rng.randint(1, 7))) for _ in range(6000)}
    pattern = re.compile(decimal_pattern(max_digits, places, lower))
    adapter = pydantic.TypeAdapter(Annotated[decimal.Decimal, Field(max_digits=max_digits, decimal_places=places,
                                                                    **LOWER[lower])])
    taken = 0
    for s in strings:
        try:
            adapter.validate_python(s)
            ok = True
        except pydantic.ValidationError:
            ok = False
        assert bool(pattern.fullmatch(s)) == ok or (ok and s.startswith("-") and lower == "zero"), (s, ok)
        taken += ok
    assert taken > 20


def test_the_longest_duration_the_pattern_allows_validates():
    """Every part at its digit cap at once: still inside pydantic's limits (999,999,999
    days; 2**32 - 1 seconds in the time part)."""
    longest = "P999999Y999999M999999W99999999DT99999H9999999M999999999S"
    assert re.fullmatch(DURATION_PATTERN, longest)
    pydantic.TypeAdapter(dt.timedelta).validate_python(longest)
    for over in ("P9999999Y", "PT999999H", "PT99999999M", "PT9999999999S", "P999999999D"):
        assert not re.fullmatch(DURATION_PATTERN, over)
