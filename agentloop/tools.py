"""Tools from plain Python functions: schema from type hints and docstring, validation, execution.

>>> from typing import Literal
>>> @tool
... def get_weather(city: str, days: int = 1, units: Literal["metric", "imperial"] = "metric") -> str:
...     '''Weather forecast for a city.
...
...     Args:
...         city: City name, e.g. "Paris".
...         days: How many days ahead (1-7).
...     '''
...     return f"{city}: sunny for {days} days"
>>> get_weather.name, get_weather.description
('get_weather', 'Weather forecast for a city.')
>>> get_weather.parameters["properties"]["city"]
{'description': 'City name, e.g. "Paris".', 'type': 'string'}
>>> get_weather.parameters["required"]
['city']
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Generic, TypeVar, get_args, get_origin, get_type_hints, overload

import anyio
import anyio.to_thread
import pydantic
import pydantic_core

from .argument_schema import ArgumentsJsonSchema
from .errors import SchemaError, ToolDefinitionError
from .grammar import ToolSchema, check_schema
from .grammar.schema import rewrite_schemas

DepsT = TypeVar("DepsT")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_T = TypeVar("_T")

#: A parameter whose value the model copies from the conversation: ``city: Copied[str]``.
#: The copy constraint holds it to what the user wrote and the tools returned in the run so
#: far: a string must be a substring of one of those texts, a number one of the numbers
#: written in them (whole). A small model that would misspell a name or a figure cannot; a
#: value that occurs nowhere cannot be passed at all. In a raw JSON schema the same mark is
#: ``"x-copy": true``; ``Agent(copy_constraint=False)`` ignores it.
Copied = Annotated[_T, pydantic.Field(json_schema_extra={"x-copy": True})]

#: A string parameter that is free text but whose numbers the model copies from the
#: conversation: ``expression: CopiedNumbers[str]`` takes "327 * 848" after "what's 327
#: times 848", never "327 * 888". A number in it is a run of digits with its fraction
#: ("6.83"), and must be one the user wrote or a tool returned, whole. In a raw JSON schema:
#: ``"x-copy": "numbers"``.
CopiedNumbers = Annotated[_T, pydantic.Field(json_schema_extra={"x-copy": "numbers"})]


@dataclass
class RunContext(Generic[DepsT]):
    """What a tool can receive besides its arguments: declare a first parameter typed
    ``RunContext[...]`` (it is not part of the schema). ``deps`` is whatever the caller passed
    to ``Agent.run(..., deps=...)``: a database handle, a sandbox folder, a user id."""

    deps: DepsT
    step: int = 0  #: the model step (1-based) whose call this is
    tool_name: str = ""
    retry: int = 0  #: how many times this tool already failed in this run


@dataclass(frozen=True)
class ToolResult:
    """What a call returned, as the model will read it."""

    name: str
    content: str
    is_error: bool = False
    seconds: float = 0.0


class Tool:
    """A function the model can call. Build with :func:`tool`; call with :meth:`run`."""

    def __init__(self, function: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                 timeout: float | None = 30.0, retries: int = 1, requires_approval: bool = False,
                 wire_format: str = "gemma4") -> None:
        self.function = function
        self.name = name or function.__name__
        where = f"tool {self.name!r} ({_where(function)})"
        if not _NAME.match(self.name):
            raise ToolDefinitionError(f"{where}: a tool name must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if timeout is not None and timeout <= 0:
            raise ToolDefinitionError(f"{where}: timeout must be > 0 seconds or None")
        if retries < 0:
            raise ToolDefinitionError(f"{where}: retries must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.requires_approval = requires_approval
        self.is_async = inspect.iscoroutinefunction(function)
        summary, arg_docs = parse_docstring(inspect.getdoc(function) or "")
        self.description = description if description is not None else summary
        self.takes_ctx, self._model, schema = _arguments_model(function, self.name, arg_docs, where)
        self.parameters: dict[str, Any] = _clean_schema(schema)
        try:
            #: where the grammar generates fewer argument values than the schema allows
            #: under the default ``SchemaOptions`` (``grammar.Narrowing``: a string longer
            #: than 512 characters, nesting deeper than the bound under a ``dict[str, Any]``),
            #: pointers into ``parameters``
            self.narrowings = check_schema(self.parameters, wire_format)
        except SchemaError as e:
            raise ToolDefinitionError(f"{where}: {_parameter_of(e.pointer)} cannot be constrained: {e}") from None

    @property
    def tool_schema(self) -> ToolSchema:
        """The tool as the grammar compiles it."""
        return ToolSchema(self.name, self.parameters, self.description)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Arguments checked and converted by pydantic (nested models become instances).

        They are read as the JSON the model wrote, as pydantic reads JSON: under
        ``strict=True`` an ISO string is a date, a UUID, a Decimal there, whereas as a
        Python value it is refused (and so would be every call the grammar allows). Values
        with no JSON form (passed from Python) are read as they are."""
        try:
            text = pydantic_core.to_json(arguments)
        except pydantic_core.PydanticSerializationError:
            model = self._model.model_validate(arguments)
        else:
            model = self._model.model_validate_json(text)
        return {k: getattr(model, k) for k in type(model).model_fields}

    async def run(self, arguments: dict[str, Any], ctx: RunContext[Any] | None = None) -> ToolResult:
        """Validate, call (sync functions in a worker thread) under the timeout, and turn any
        failure into an error result the model can read. Never raises for a tool's failure."""
        t0 = time.perf_counter()
        try:
            kwargs = self.validate(arguments)
        except pydantic.ValidationError as e:
            return ToolResult(self.name, f"invalid arguments for {self.name}: {_short_errors(e)}", True,
                              time.perf_counter() - t0)
        args = (ctx if ctx is not None else RunContext(None, tool_name=self.name),) if self.takes_ctx else ()
        try:
            with anyio.move_on_after(self.timeout) as scope:
                if self.is_async:
                    value = await self.function(*args, **kwargs)
                else:
                    # A sync function cannot be interrupted: on timeout or cancellation its
                    # thread is left to finish on its own. Write long tools as async functions.
                    value = await anyio.to_thread.run_sync(lambda: self.function(*args, **kwargs),
                                                           abandon_on_cancel=True)
            if scope.cancelled_caught:
                return ToolResult(self.name, f"{self.name} timed out after {self.timeout:g} s", True,
                                  time.perf_counter() - t0)
        except Exception as e:  # a tool's bug or refusal (its own TimeoutError too) is the model's to handle
            return ToolResult(self.name, f"{self.name} failed: {type(e).__name__}: {e}", True,
                              time.perf_counter() - t0)
        return ToolResult(self.name, render_result(value), False, time.perf_counter() - t0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function stays callable as before."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"


F = TypeVar("F", bound=Callable[..., Any])


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(*, name: str | None = None, description: str | None = None, timeout: float | None = 30.0,
         retries: int = 1, requires_approval: bool = False,
         wire_format: str = "gemma4") -> Callable[[Callable[..., Any]], Tool]: ...


def tool(function: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None,
         timeout: float | None = 30.0, retries: int = 1, requires_approval: bool = False,
         wire_format: str = "gemma4") -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function (sync or async) a :class:`Tool`, bare (``@tool``) or with options
    (``@tool(timeout=5, retries=2, requires_approval=True)``).

    ``retries`` is how many failed calls (exception, timeout, invalid arguments) the model
    may correct before the run stops with ``ToolRetriesExhausted``. ``wire_format`` is the
    one the schema is checked against at definition (gemma4's keys must be identifiers;
    pass ``"json"`` for an agent that speaks JSON and a parameter aliased ``first-name``).
    """
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, timeout=timeout, retries=retries,
                    requires_approval=requires_approval, wire_format=wire_format)

    return wrap(function) if function is not None else wrap


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    """A Tool as is; a plain function through ``@tool`` defaults."""
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return Tool(obj)
    raise ToolDefinitionError(f"{obj!r} is neither a Tool nor a function")


# ---- results -----------------------------------------------------------------------------------


def render_result(value: Any) -> str:
    """A tool's return value as text for the model: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(pydantic.TypeAdapter(Any).dump_python(value, mode="json"), ensure_ascii=False)
    except (TypeError, ValueError, pydantic.PydanticSerializationError):
        return str(value)


def _short_errors(e: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())


# ---- schema from the signature -------------------------------------------------------------------


def _where(f: Callable[..., Any]) -> str:
    code = getattr(f, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else repr(f)


def _is_ctx(annotation: Any) -> bool:
    return annotation is RunContext or get_origin(annotation) is RunContext


def _arguments_model(f: Callable[..., Any], name: str, docs: dict[str, str],
                     where: str) -> tuple[bool, type[pydantic.BaseModel], dict[str, Any]]:
    """(whether ``f`` takes a ``RunContext`` first, its arguments' model, the model's JSON Schema)."""
    try:
        hints = get_type_hints(f, include_extras=True)
    except Exception as e:  # an annotation that does not evaluate
        raise ToolDefinitionError(f"{where}: cannot read its type hints: {e}") from None
    params = list(inspect.signature(f).parameters.values())
    takes_ctx = bool(params) and _is_ctx(hints.get(params[0].name))
    fields: dict[str, Any] = {}
    for i, p in enumerate(params):
        if i == 0 and takes_ctx:
            continue
        if _is_ctx(hints.get(p.name)):
            raise ToolDefinitionError(f"{where}: RunContext must be the first parameter, not {p.name!r}")
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolDefinitionError(f"{where}: parameter {p.name!r}: *args/**kwargs cannot be described to the "
                                      "model; list the arguments explicitly")
        if p.kind is p.POSITIONAL_ONLY:
            raise ToolDefinitionError(f"{where}: parameter {p.name!r} is positional-only; the model passes "
                                      "arguments by name")
        if p.name not in hints:
            raise ToolDefinitionError(f"{where}: parameter {p.name!r} has no type hint; the schema the model "
                                      f"writes to comes from it (e.g. `{p.name}: str`)")
        ann = hints[p.name]
        _check_annotation(ann, p.name, where)
        default = p.default if p.default is not p.empty else ...
        fi = pydantic.Field(default=default, description=docs.get(p.name)) if docs.get(p.name) else default
        fields[p.name] = (ann, fi)
    try:
        model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        schema = model.model_json_schema(schema_generator=ArgumentsJsonSchema)
    except Exception as e:  # pydantic's schema and validator errors have no common base
        raise ToolDefinitionError(f"{where}: pydantic cannot build its arguments: {e}") from None
    return takes_ctx, model, schema


def _check_annotation(ann: Any, param: str, where: str) -> None:
    """Reject what pydantic accepts but no JSON value can carry."""
    origin = get_origin(ann)
    if ann in (bytes, bytearray, set, frozenset) or origin in (set, frozenset):
        raise ToolDefinitionError(f"{where}: parameter {param!r}: {getattr(ann, '__name__', ann)} has no plain JSON "
                                  "spelling; use str or list")
    if callable(ann) and not isinstance(ann, type) and origin is None and ann is not Any:
        raise ToolDefinitionError(f"{where}: parameter {param!r}: {ann!r} is not a type")
    for a in get_args(ann):
        if a is not Ellipsis and not isinstance(a, (str, int, float, bool, enum.Enum)) and a is not None:
            if isinstance(a, type) or get_origin(a) is not None:
                _check_annotation(a, param, where)


def _clean_schema(schema: Any) -> Any:
    """Drop pydantic's ``title`` annotations (noise in the prompt); keep everything that validates."""
    return rewrite_schemas(schema, lambda s: {k: v for k, v in s.items() if k != "title"})


def _parameter_of(pointer: str) -> str:
    parts = [p for p in pointer.split("/") if p]
    if len(parts) >= 2 and parts[0] == "properties":
        return f"parameter {parts[1]!r}"
    if len(parts) >= 2 and parts[0] == "$defs":
        return f"model {parts[1]!r}" + (f" field {parts[3]!r}" if len(parts) >= 4 and parts[2] == "properties" else "")
    return "its parameters"


# ---- docstrings ----------------------------------------------------------------------------------

_SPHINX = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+):\s*(.*)$")
_GOOGLE_HEAD = re.compile(r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments)\s*:\s*$")
_GOOGLE_ITEM = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ITEM = re.compile(r"^(\w+)\s*(?::.*)?$")
_SECTION = re.compile(r"^(Returns?|Raises|Yields|Examples?|Notes?|See Also|References|Attributes|Warnings?)\s*:?\s*$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary and per-argument descriptions of a Google, NumPy or Sphinx docstring.

    >>> parse_docstring(":param city: The city.\\n:returns: text")
    ('', {'city': 'The city.'})
    >>> parse_docstring("Sum.\\n\\nParameters\\n----------\\nx : int\\n    First.\\n")
    ('Sum.', {'x': 'First.'})
    """
    lines = doc.expandtabs().splitlines()
    summary: list[str] = []
    i = 0
    while i < len(lines) and lines[i].strip() and not _starts_section(lines, i):
        summary.append(lines[i].strip())
        i += 1
    args: dict[str, str] = {}
    cur: str | None = None
    mode = ""
    base_indent = item_indent = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        indent = len(line) - len(s) if s else 0
        m = _SPHINX.match(s)
        if m:
            cur, mode = m.group(1), "sphinx"
            args[cur] = m.group(2).strip()
        elif s.startswith(":"):
            cur = None
        elif _GOOGLE_HEAD.match(s):
            mode, cur, base_indent = "google", None, indent
        elif s in ("Parameters", "Other Parameters") and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            mode, cur, base_indent = "numpy", None, indent
            i += 1
        elif _SECTION.match(s) or (i + 1 < len(lines) and s and set(lines[i + 1].strip()) == {"-"}):
            mode, cur = "", None
        elif mode == "google" and s and indent > base_indent and (m2 := _GOOGLE_ITEM.match(s)) and \
                (cur is None or indent <= item_indent):
            cur, item_indent = m2.group(1), indent
            args[cur] = m2.group(2).strip()
        elif mode == "numpy" and s and indent == base_indent and (m3 := _NUMPY_ITEM.match(s)):
            cur = m3.group(1)
            args[cur] = ""
        elif s and cur is not None and mode:
            args[cur] = (args[cur] + " " + s).strip()
        elif not s and mode == "sphinx":
            cur = None
        i += 1
    return " ".join(summary), {k: v for k, v in args.items() if v}


def _starts_section(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return bool(_GOOGLE_HEAD.match(s) or _SPHINX.match(s) or s.startswith(":") or _SECTION.match(s)
                or (i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}))


# ---- loading tools by path -----------------------------------------------------------------------


def load_tools(spec: str) -> list[Tool]:
    """Tools from ``path/to/file.py``, ``path/to/file.py:name`` or ``package.module[:name]``.

    A module's tools are its module-level :class:`Tool` objects (``@tool`` functions), in
    definition order, or its ``TOOLS`` list when it defines one.
    """
    target, _, attr = spec.partition(":") if not re.match(r"^[A-Za-z]:\\", spec) else (spec, "", "")
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise ToolDefinitionError(f"tools file {target!r} does not exist")
        mod_name = f"agentloop_tools_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ToolDefinitionError(f"cannot import {target!r} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except ToolDefinitionError:
            raise
        except Exception as e:
            raise ToolDefinitionError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ToolDefinitionError(f"cannot import tools module {target!r}: {e}") from None
    if attr:
        obj = getattr(module, attr, None)
        if obj is None:
            raise ToolDefinitionError(f"{target!r} has no {attr!r}")
        return [as_tool(o) for o in obj] if isinstance(obj, (list, tuple)) else [as_tool(obj)]
    listed = getattr(module, "TOOLS", None)
    if listed is not None:
        return [as_tool(o) for o in listed]
    found = [v for v in vars(module).values() if isinstance(v, Tool)]
    if not found:
        raise ToolDefinitionError(f"{target!r} defines no tools (decorate functions with @agentloop.tool)")
    return found


__all__ = ["RunContext", "Tool", "ToolResult", "as_tool", "load_tools", "parse_docstring", "render_result", "tool"]
