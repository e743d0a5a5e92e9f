"""Demo tools the bundled model knows: weather, calculator, unit conversion, time, notes, files.

The bundled model's training data (``agentloop.training.data``) is made by calling these
very functions, so what it reads at run time is what it learned from. Load them as
``--tools agentloop.demo_tools`` or by path, ``--tools tools/demo.py`` (all) or
``--tools tools/demo.py:calculator`` (one). Everything is offline and deterministic except
``get_time``. Names, numbers, days, titles, paths and contents are ``Copied``, and the
calculator's expression is ``CopiedNumbers``: the copy constraint holds the model to values
(and numbers) written in the conversation. Notes and files live in a sandbox folder: ``deps.sandbox`` when the agent is
run with such deps, else ``$AGENTLOOP_SANDBOX``, else ``./agentloop-sandbox``; paths cannot
leave it.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import math
import operator
import os
import threading
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import pydantic

from agentloop import Copied, CopiedNumbers, RunContext, tool

CONDITIONS = ["sunny", "partly cloudy", "cloudy", "light rain", "rain", "thunderstorms", "fog", "snow", "windy"]

CITY_TIMEZONES = {
    "amsterdam": "Europe/Amsterdam", "athens": "Europe/Athens", "bangkok": "Asia/Bangkok", "berlin": "Europe/Berlin",
    "buenos aires": "America/Argentina/Buenos_Aires", "cairo": "Africa/Cairo", "chicago": "America/Chicago",
    "delhi": "Asia/Kolkata", "dubai": "Asia/Dubai", "hong kong": "Asia/Hong_Kong", "istanbul": "Europe/Istanbul",
    "jakarta": "Asia/Jakarta", "johannesburg": "Africa/Johannesburg", "lagos": "Africa/Lagos", "lima": "America/Lima",
    "lisbon": "Europe/Lisbon", "london": "Europe/London", "los angeles": "America/Los_Angeles",
    "madrid": "Europe/Madrid", "mexico city": "America/Mexico_City", "moscow": "Europe/Moscow",
    "mumbai": "Asia/Kolkata", "nairobi": "Africa/Nairobi", "new york": "America/New_York", "oslo": "Europe/Oslo",
    "paris": "Europe/Paris", "rome": "Europe/Rome", "san francisco": "America/Los_Angeles",
    "sao paulo": "America/Sao_Paulo", "seoul": "Asia/Seoul", "shanghai": "Asia/Shanghai",
    "singapore": "Asia/Singapore", "stockholm": "Europe/Stockholm", "sydney": "Australia/Sydney",
    "tokyo": "Asia/Tokyo", "toronto": "America/Toronto", "vienna": "Europe/Vienna", "warsaw": "Europe/Warsaw",
    "zurich": "Europe/Zurich",
}

Unit = Literal["km", "mi", "m", "ft", "cm", "in", "kg", "lb", "g", "oz", "C", "F", "K", "l", "gal"]

# unit -> (dimension, factor to the base unit); temperatures are converted separately
_LINEAR = {"km": ("length", 1000.0), "m": ("length", 1.0), "cm": ("length", 0.01), "mi": ("length", 1609.344),
           "ft": ("length", 0.3048), "in": ("length", 0.0254), "kg": ("mass", 1.0), "g": ("mass", 0.001),
           "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125), "l": ("volume", 1.0),
           "gal": ("volume", 3.785411784)}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).lower().encode()).digest()[:8], "big")


@tool
def get_weather(city: Copied[str], days: Copied[int] = 1) -> str:
    """Weather forecast for a city.

    Args:
        city: City name, e.g. "Paris".
        days: Number of days to forecast, from 1 to 7.
    """
    if not 1 <= days <= 7:
        raise ValueError("days must be between 1 and 7")
    lines = []
    for d in range(days):
        h = _seed(city.strip(), d)
        temp = -5 + h % 36
        cond = CONDITIONS[(h >> 8) % len(CONDITIONS)]
        lines.append(f"day {d + 1}: {cond}, {temp} C")
    return f"{city.strip()}: " + "; ".join(lines)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_BITS = 4096
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "sin": math.sin, "cos": math.cos}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * math.log2(abs(left)) > _MAX_BITS:
            raise ValueError("result too large")
        value = _OPS[type(node.op)](left, right)
        # Big integers hold the GIL while they grow: refuse before they can stall the loop.
        if isinstance(value, int) and value.bit_length() > _MAX_BITS:
            raise ValueError("result too large")
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    if isinstance(node, ast.Name) and node.id in ("pi", "e"):
        return math.pi if node.id == "pi" else math.e
    raise ValueError(f"unsupported expression: {ast.unparse(node)}")


def _expression_pattern() -> str:
    """Operands and operators in turn. An operand is a number (digits, a fraction, an
    exponent: "1.00584e+06", as a tool prints it), pi or e, opened by any "(", "-" or
    function call and closed by any ")"; a "," separates like an operator. Whether the
    parentheses balance is left to the evaluator: nesting is not a regular language, and a
    regex for two levels of it is 6,600 characters, too long to declare in a prompt."""
    operand = r"(?:[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|pi|e)"
    opening = r"(?:(?:sqrt|abs|round|log|sin|cos)?\(\s*|-\s*)*"
    closing = r"(?:\s*\))*"
    between = r"(?:\s*(?:\*\*|//|[-+*/%x,])\s*)"
    term = opening + operand + closing
    return rf"^\s*{term}(?:{between}{term})*\s*$"


#: An arithmetic expression as ``_eval`` reads it, with one more operator: "x", which
#: people write for times (the tool rejects it with a message, and the model is trained to
#: correct the call). A canvas cannot spell two numbers with no operator between them, an
#: operator with no operand, or "40." with the sentence's full stop.
EXPRESSION_PATTERN = _expression_pattern()


@tool
def calculator(expression: Annotated[CopiedNumbers[str], pydantic.Field(pattern=EXPRESSION_PATTERN)]) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers, + - * / // % **, parentheses, sqrt, abs, round, log, sin, cos, pi, e.
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _eval(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


@tool
def convert_units(value: Copied[float], from_unit: Unit, to_unit: Unit) -> str:
    """Convert a quantity between units of length, mass, volume or temperature.

    Args:
        value: The quantity to convert.
        from_unit: Its unit.
        to_unit: The unit wanted.
    """
    temps = {"C", "F", "K"}
    if from_unit in temps or to_unit in temps:
        if not (from_unit in temps and to_unit in temps):
            raise ValueError(f"cannot convert {from_unit} to {to_unit}")
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        out = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    else:
        (dim_a, fa), (dim_b, fb) = _LINEAR[from_unit], _LINEAR[to_unit]
        if dim_a != dim_b:
            raise ValueError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
        out = value * fa / fb
    return f"{value:g} {from_unit} = {round(out, 4):g} {to_unit}"


@tool
def get_time(city: Copied[str]) -> str:
    """Current local time in a city.

    Args:
        city: City name, e.g. "Tokyo".
    """
    tz = CITY_TIMEZONES.get(city.strip().lower())
    if tz is None:
        raise ValueError(f"unknown city {city!r}; known: {', '.join(sorted(c.title() for c in CITY_TIMEZONES))}")
    now = dt.datetime.now(ZoneInfo(tz))
    return f"{city.strip()}: {now:%Y-%m-%d %H:%M} ({tz})"


# ---- the sandbox: notes and files ------------------------------------------------------------------


_NOTES_LOCK = threading.Lock()


def _sandbox(ctx: RunContext[Any]) -> Path:
    deps = ctx.deps
    root = getattr(deps, "sandbox", None) or (deps if isinstance(deps, (str, Path)) else None) \
        or os.environ.get("AGENTLOOP_SANDBOX") or "agentloop-sandbox"
    p = Path(root).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def _inside(ctx: RunContext[Any], path: str) -> Path:
    root = _sandbox(ctx)
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise PermissionError(f"{path!r} is outside the sandbox")
    return target


@tool
def add_note(ctx: RunContext[Any], title: Copied[str], text: Copied[str]) -> str:
    """Save a note.

    Args:
        title: A short title.
        text: The note.
    """
    f = _sandbox(ctx) / "notes.json"
    with _NOTES_LOCK:  # parallel calls run in threads: read-modify-write one at a time
        notes = json.loads(f.read_text("utf-8")) if f.exists() else []
        notes.append({"title": title, "text": text})
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(notes, ensure_ascii=False, indent=1), "utf-8")
        os.replace(tmp, f)  # atomic: a reader never sees half a file
    return f"saved note {len(notes)}: {title}"


@tool
def list_notes(ctx: RunContext[Any]) -> str:
    """List the saved notes."""
    f = _sandbox(ctx) / "notes.json"
    notes = json.loads(f.read_text("utf-8")) if f.exists() else []
    if not notes:
        return "no notes"
    return "\n".join(f"{i + 1}. {n['title']}: {n['text']}" for i, n in enumerate(notes))


@tool
def list_files(ctx: RunContext[Any]) -> str:
    """List the files in the sandbox folder."""
    root = _sandbox(ctx)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return "\n".join(files) if files else "no files"


@tool
def read_file(ctx: RunContext[Any], path: Copied[str]) -> str:
    """Read a text file from the sandbox folder.

    Args:
        path: Path inside the sandbox, e.g. "todo.txt".
    """
    f = _inside(ctx, path)
    if not f.is_file():
        raise FileNotFoundError(f"no file {path!r}")
    data = f.read_text("utf-8", errors="replace")
    return data if len(data) <= 4000 else data[:4000] + f"\n[... {len(data) - 4000} more characters]"


@tool
def write_file(ctx: RunContext[Any], path: Copied[str], content: Copied[str]) -> str:
    """Write a text file in the sandbox folder (replacing it).

    Args:
        path: Path inside the sandbox, e.g. "todo.txt".
        content: The text to write.
    """
    f = _inside(ctx, path)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(content, "utf-8")
    return f"wrote {len(content)} characters to {path}"


TOOLS = [get_weather, calculator, convert_units, get_time, add_note, list_notes, list_files, read_file, write_file]
