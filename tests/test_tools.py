"""Tools from Python functions: schemas from type hints and docstrings, validation, execution, loading."""

from __future__ import annotations

import datetime
import json
import pathlib

import enum
import textwrap
import threading
from typing import Annotated, Any, Literal, Optional

import anyio
import pydantic
import pytest

from agentloop import RunContext, Tool, ToolDefinitionError, load_tools, tool
from agentloop.grammar import byte_tokenizer, compile_tools
from agentloop.protocol import Protocol
from agentloop.tools import parse_docstring, render_result


class Unit(enum.Enum):
    km = "km"
    mi = "mi"


class Address(pydantic.BaseModel):
    street: str
    city: str = "Paris"


_NO_DEFAULT = object()


def schema_of(annotation: Any, default: Any = _NO_DEFAULT) -> dict:
    ns: dict[str, Any] = {"T": annotation}
    if default is _NO_DEFAULT:
        exec("def f(x: T): return x", ns)
    else:
        ns["D"] = default
        exec("def f(x: T = D): return x", ns)
    t = tool(ns["f"])
    return t.parameters


@pytest.mark.parametrize("annotation, expected", [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (Literal["a", "b"], {"enum": ["a", "b"], "type": "string"}),
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
    (Optional[int], {"anyOf": [{"type": "integer"}, {"type": "null"}]}),
    (Annotated[int, pydantic.Field(ge=1, le=7)], {"type": "integer", "minimum": 1, "maximum": 7}),
    (Annotated[str, pydantic.Field(max_length=20, pattern=r"^[A-Z]")],
     {"type": "string", "maxLength": 20, "pattern": "^[A-Z]"}),
])
def test_schema_from_annotation(annotation: Any, expected: dict) -> None:
    s = schema_of(annotation)
    assert s["properties"]["x"] == expected
    assert s["required"] == ["x"] and s["additionalProperties"] is False


def test_enum_and_nested_models() -> None:
    s = schema_of(Unit)
    assert s["properties"]["x"] == {"$ref": "#/$defs/Unit"}
    assert s["$defs"]["Unit"] == {"enum": ["km", "mi"], "type": "string"}
    s = schema_of(Optional[Address], None)
    assert s["$defs"]["Address"]["required"] == ["street"]
    assert "required" not in s


def test_every_generated_schema_compiles_and_calls_round_trip() -> None:
    @tool
    def book(ctx: RunContext[None], city: str, nights: Annotated[int, pydantic.Field(ge=1, le=14)],
             unit: Unit, address: Address, tags: list[str], extra: dict[str, int], note: Optional[str] = None,
             kind: Literal["hotel", "flat"] = "hotel") -> str:
        """Book a stay.

        Args:
            city: Where.
            nights: How long.
        """
        return f"{city} {nights} {unit.value} {address.street} {kind}"

    assert book.takes_ctx and "ctx" not in book.parameters["properties"]
    tok = byte_tokenizer()
    g = compile_tools([book], tok, "gemma4")
    args = {"city": "Oslo", "nights": 2, "unit": "km", "address": {"street": "Main"}, "tags": ["a"],
            "extra": {"k": 1}, "note": None, "kind": "flat"}
    text = Protocol("gemma4").render_call("book", args, book.parameters) + "<|tool_response>"
    assert g.accepts(tok.encode(text).ids)
    out = anyio.run(book.run, args)
    assert out.content == "Oslo 2 km Main flat" and not out.is_error


@pytest.mark.parametrize("doc", [
    """Get weather.

    Args:
        city: The city
            name, in English.
        days (int): Days ahead.

    Returns:
        A report.
    """,
    """Get weather.

    Parameters
    ----------
    city : str
        The city
        name, in English.
    days : int
        Days ahead.

    Returns
    -------
    str
    """,
    """Get weather.

    :param city: The city
        name, in English.
    :param int days: Days ahead.
    :returns: A report.
    """,
], ids=["google", "numpy", "sphinx"])
def test_docstring_styles(doc: str) -> None:
    summary, args = parse_docstring(textwrap.dedent(doc))
    assert summary == "Get weather."
    assert args == {"city": "The city name, in English.", "days": "Days ahead."}


@pytest.mark.parametrize("src, message", [
    ("def f(x): pass", "parameter 'x' has no type hint"),
    ("def f(*xs: int): pass", "parameter 'xs': *args"),
    ("def f(x: bytes): pass", "parameter 'x': bytes has no plain JSON spelling"),
    ("def f(x: set[int]): pass", "parameter 'x'"),
    ("def f(x: int, /): pass", "positional-only"),
    ("def f(x: int, ctx: RunContext): pass", "RunContext must be the first parameter"),
    ("def f(x: Annotated[str, pydantic.Field(pattern=r'\\p{L}')]): pass", "parameter 'x' cannot be constrained"),
    ("def f(x: Annotated[str, pydantic.Field(pattern=r'(?=a)')]): pass", "pydantic cannot build"),
])
def test_bad_definitions_name_the_parameter(src: str, message: str) -> None:
    ns: dict[str, Any] = {"RunContext": RunContext, "Annotated": Annotated, "pydantic": pydantic}
    exec(src, ns)
    with pytest.raises(ToolDefinitionError, match=message.replace("*", r"\*").replace("(", r"\(")):
        tool(ns["f"])
    with pytest.raises(ToolDefinitionError, match="identifier"):
        tool(name="bad name")(lambda: None)


def test_formats_the_spec_does_not_define_are_annotations() -> None:
    from agentloop.grammar import byte_tokenizer, compile_tools

    def read(path: pathlib.Path, secret: pydantic.SecretStr) -> str:
        return str(path)

    t = tool(read)  # pydantic writes "format": "path" / "password"
    g = compile_tools([t], byte_tokenizer(), allow_text=False)
    assert g.accepts_json([{"name": "read", "arguments": {"path": "notes/a.txt", "secret": "x"}}])


class _Person(pydantic.BaseModel):
    first_name: str = pydantic.Field(alias="first-name")


def test_the_wire_format_a_tool_is_checked_against() -> None:
    def greet(person: _Person) -> str:
        return person.first_name

    with pytest.raises(ToolDefinitionError, match="gemma4"):
        tool(greet)  # (gemma4's keys are identifiers)
    t = tool(wire_format="json")(greet)
    assert "first-name" in json.dumps(t.parameters)


def test_validation_and_execution() -> None:
    seen = []

    @tool
    def sync_tool(n: int) -> dict:
        """Sync."""
        seen.append(threading.current_thread() is threading.main_thread())
        return {"n": n, "sq": n * n}

    r = anyio.run(sync_tool.run, {"n": "3"})  # lax pydantic: "3" -> 3
    assert r.content == '{"n": 3, "sq": 9}' and seen == [False]  # ran in a worker thread
    bad = anyio.run(sync_tool.run, {"n": "three"})
    assert bad.is_error and bad.content.startswith("invalid arguments for sync_tool: n:")
    extra = anyio.run(sync_tool.run, {"n": 1, "m": 2})
    assert extra.is_error and "m: Extra inputs are not permitted" in extra.content
    assert sync_tool(4) == {"n": 4, "sq": 16}  # still a plain function


class Stay(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    arrive: datetime.date


def test_arguments_are_read_as_the_json_the_model_wrote() -> None:
    """Under ``strict=True`` pydantic refuses an ISO string as a Python date value but
    takes it in JSON, which is what the model writes (the grammar allows the string)."""

    @tool
    def book(stay: Stay) -> str:
        """Book."""
        return stay.arrive.isoformat()

    ok = anyio.run(book.run, {"stay": {"arrive": "2024-05-01"}})
    assert not ok.is_error and ok.content == "2024-05-01"
    assert not anyio.run(book.run, {"stay": {"arrive": datetime.date(2024, 5, 1)}}).is_error  # from Python
    bad = anyio.run(book.run, {"stay": {"arrive": "2024-02-30"}})
    assert bad.is_error and "stay.arrive" in bad.content


def test_render_result() -> None:
    assert render_result("x") == "x"
    assert render_result(Address(street="a")) == '{"street":"a","city":"Paris"}'
    assert render_result([1, 2.5, None]) == "[1, 2.5, null]"
    assert render_result(Unit.km) == '"km"'


def test_load_tools(tmp_path) -> None:
    f = tmp_path / "mytools.py"
    f.write_text(textwrap.dedent('''
        from agentloop import tool

        @tool
        def one(x: int) -> int:
            """First."""
            return x

        @tool(timeout=3)
        def two(y: str) -> str:
            """Second."""
            return y

        def helper(z): ...
    '''))
    assert [t.name for t in load_tools(str(f))] == ["one", "two"]
    (t,) = load_tools(f"{f}:two")
    assert t.timeout == 3
    with pytest.raises(ToolDefinitionError, match="has no 'three'"):
        load_tools(f"{f}:three")
    with pytest.raises(ToolDefinitionError, match="does not exist"):
        load_tools(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("from agentloop import tool\n@tool\ndef f(x): pass\n")
    with pytest.raises(ToolDefinitionError, match="parameter 'x' has no type hint"):
        load_tools(str(bad))
    assert isinstance(load_tools("agentloop.tools:parse_docstring")[0], Tool) is True
