"""Synthetic tool-use conversations over the demo tools, reproducible from a seed.

Conversations are rendered exactly as ``Agent`` renders them at run time (same protocol,
same literal encoding of user and tool text), so the model trains on the text it will read.
Entity values (places, numbers, titles, file names) are drawn from open distributions
(invented words, random digits): a model cannot memorise them, it has to copy them. The
held-out split uses phrasings never seen in training and fresh entities.

>>> a = list(conversations(3, seed=7, split="train"))
>>> a == list(conversations(3, seed=7, split="train"))
True
>>> a[0].kind in KINDS
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from .. import demo_tools as demo
from ..grammar import ToolCall

Split = Literal["train", "heldout"]
KINDS = ("single", "chain", "parallel", "answer", "error")
INSTRUCTIONS = "You are a helpful assistant. Use the tools when they help."

_SYL = ["ka", "lo", "mi", "ren", "ta", "vo", "sel", "dar", "ni", "qu", "bel", "tor", "ash", "en", "ri", "mo", "zan",
        "pe", "lu", "gor", "fi", "ha", "ul", "xi", "ber", "cal", "dov", "em", "is", "jor", "wen", "sa", "tu", "ko"]
_WORDS = ["milk", "eggs", "bread", "meeting", "report", "garden", "budget", "trip", "book", "call", "dentist",
          "invoice", "plants", "keys", "ticket", "gift", "recipe", "laptop", "train", "lesson"]
_UNITS = {"km": ["km", "kilometers"], "mi": ["miles", "mi"], "m": ["meters", "m"], "ft": ["feet", "ft"],
          "cm": ["centimeters", "cm"], "in": ["inches", "in"], "kg": ["kg", "kilograms"], "lb": ["pounds", "lb"],
          "g": ["grams", "g"], "oz": ["ounces", "oz"], "C": ["Celsius", "degrees C"], "F": ["Fahrenheit", "degrees F"], "K": ["kelvin", "K"],
          "l": ["liters", "l"], "gal": ["gallons", "gal"]}
_DIMS = [["km", "mi", "m", "ft"], ["cm", "in", "m"], ["kg", "lb", "g", "oz"], ["C", "F", "K"], ["l", "gal"]]
_OPS = {"+": ["plus", "+"], "-": ["minus", "-"], "*": ["times", "*", "multiplied by"], "/": ["divided by", "/"]}

# Phrasings per intent: (trained, held out). The held-out ones are never trained on, and
# training phrasings are further varied on the surface (see ``_surface``), so that a model
# must read the request's words rather than recognise a template.
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "weather": (
        ["What's the weather in {city}?", "Weather in {city}, please.", "How is the weather in {city}?",
         "Tell me the weather for {city}.", "Is it sunny in {city}?", "Forecast for {city}?",
         "what is the weather like in {city}", "Check the weather in {city} for me.",
         "Do I need an umbrella in {city}?", "Is it raining in {city}?", "Weather {city}", "{city} weather?",
         "How cold is it in {city}?", "What's the forecast for {city}?", "Any rain in {city} today?",
         "Give me the weather in {city}.", "Look up the weather in {city}.", "Is it cold in {city} today?",
         "What is the temperature in {city}?", "Should I take a jacket in {city}?", "weather for {city} today",
         "How's {city} looking weather-wise?", "Can you get the weather for {city}?",
         "I'm in {city}. Weather?", "Tell me about the weather in {city} today.",
         "Weather check for {city}, please.",
         "What's it like outside in {city}?"],
        ["Weather report for {city}?", "How warm is it in {city}?", "I'm going to {city}, what's the weather?",
         "Is it going to rain in {city}?"]),
    "weather_days": (
        ["Weather in {city} for the next {days} days?", "Give me a {days} day forecast for {city}.",
         "What will the weather be in {city} over {days} days?", "{days}-day forecast for {city}, please.",
         "Forecast {city} for {days} days.", "How's the weather in {city} for the coming {days} days?",
         "Weather for {city}, {days} days.", "{city} forecast, {days} days?",
         "What's the weather going to be in {city} for {days} days?", "Forecast the next {days} days in {city}.",
         "Can I get {days} days of forecast for {city}?", "Tell me the weather in {city} for {days} days.",
         "I need a {days}-day forecast for {city}.", "{days} days of weather for {city}, please.",
         "Weather outlook for {city}, next {days} days?", "How will the weather be in {city} in the next {days} days?",
         "Weather in {city} for {days} days, please.",
         "Plan ahead: weather in {city} for {days} days?"],
        ["Show the weather in {city}, {days} days ahead.", "Next {days} days of weather in {city}?",
         "What's the {days}-day outlook for {city}?"]),
    "calc": (
        ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?", "{a} {op} {b} = ?",
         "Can you compute {a} {op} {b}?", "Work out {a} {op} {b} for me.", "{a} {op} {b}?", "Solve {a} {op} {b}.",
         "What do you get for {a} {op} {b}?", "I need {a} {op} {b}.",
         "Quick math: {a} {op} {b}", "What's the result of {a} {op} {b}?", "Figure out {a} {op} {b}.",
         "Tell me {a} {op} {b}.", "calc {a} {op} {b}", "Evaluate {a} {op} {b}, please.",
         "How much do {a} {op} {b} make?", "What does {a} {op} {b} come to?",
         "Compute {a} {op} {b}.",
         "Please work out {a} {op} {b}.",
         "What's {a} {op} {b} equal to?",
         "Do the math: {a} {op} {b}.",
         "Result of {a} {op} {b}?",
         "Help me with {a} {op} {b}."],
        ["what's {a} {op} {b}", "Please calculate {a} {op} {b}.", "How much would {a} {op} {b} be?"]),
    "convert": (
        ["Convert {v} {u1} to {u2}.", "How many {u2} is {v} {u1}?", "What is {v} {u1} in {u2}?",
         "{v} {u1} in {u2}?", "Change {v} {u1} into {u2}.", "Please convert {v} {u1} into {u2}.",
         "{v} {u1} to {u2}", "How much is {v} {u1} in {u2}?", "Turn {v} {u1} into {u2}.",
         "What's {v} {u1} in {u2}?", "Can you convert {v} {u1} to {u2}?", "{v} {u1} equals how many {u2}?",
         "I need {v} {u1} in {u2}.", "Give me {v} {u1} in {u2}.", "Convert {v} {u1} into {u2}, please.",
         "If I have {v} {u1}, how many {u2} is that?", "Show {v} {u1} as {u2}.", "From {u1} to {u2}: {v}",
         "Translate {v} {u1} into {u2}.",
         "What would {v} {u1} be in {u2}?"],
        ["I have {v} {u1}, how much is that in {u2}?", "Express {v} {u1} in {u2}.",
         "Could you turn {v} {u1} into {u2}?"]),
    "time": (
        ["What time is it in {city}?", "Current time in {city}?", "Tell me the time in {city}.",
         "What's the local time in {city}?", "Time in {city}, please.", "Do you know the time in {city}?",
         "What's the time in {city} right now?", "time in {city}", "{city} time?", "What hour is it in {city}?",
         "Give me the current time in {city}.", "Look up the time in {city}.", "Is it late in {city}?",
         "Clock time in {city}?", "How late is it in {city}?", "Can you check the time in {city}?",
         "What time do they have in {city}?", "Local time for {city}, please.",
         "What does the clock say in {city}?",
         "Check the time in {city}.",
         "Show me the time in {city}.",
         "Tell me what time it is in {city}.",
         "Clock in {city}?",
         "Time check for {city}, please.",
         "Is it morning or evening in {city}?",
         "Which time is it in {city} now?"],
        ["what time is it now in {city}", "Check the clock in {city}.", "Look at the clock for {city}."]),
    "note": (
        ["Make a note titled {title}: {text}", "Save a note called {title} saying {text}",
         "Note down {title}: {text}", "Please remember this as {title}: {text}", "Add a note {title}: {text}",
         "Write a note named {title} with {text}", "New note {title}: {text}", "Note {title}: {text}",
         "Jot down a note {title} that says {text}", "Remember {title}: {text}",
         "Create a note called {title} with the text {text}", "Add note titled {title} saying {text}",
         "Can you note {title}: {text}", "Save note {title} with {text}", "Take a note, {title}: {text}",
         "Put a note {title} down: {text}",
         "Note with title {title} and content {text}",
         "Store a note titled {title}: {text}",
         "Add a note, title {title}, text {text}",
         "Make a note {title} with the content {text}",
         "Keep this in my notes as {title}: {text}",
         "Note titled {title}, saying {text}",
         "Save this note: {title}: {text}",
         "Record a note {title}: {text}"],
        ["Create note {title}, content {text}", "Keep a note titled {title}: {text}",
         "Write down a note called {title}: {text}"]),
    "write": (
        ["Write {text} to {file}.", "Save {text} in the file {file}.", "Put {text} into {file}.",
         "Create {file} containing {text}.", "Store {text} in {file}.", "Make a file {file} with {text}.",
         "Write to {file}: {text}", "Save to {file}: {text}", "Write {text} into the file {file}.",
         "Create a file {file} that says {text}.", "Please save {text} to {file}.", "{file} should say {text}.",
         "Put the text {text} in {file}.", "Can you write {text} to {file}?", "Store the text {text} in {file}.",
         "Make {file} say {text}.",
         "Write the text {text} to the file {file}.",
         "Fill {file} with {text}.",
         "Put {text} in the file {file}, please.",
         "Save the text {text} into {file}.",
         "Could you put {text} into {file}?",
         "Write {text} in {file}.",
         "Make the file {file} with the text {text}.",
         "Store {text} into the file {file}."],
        ["Please write {text} into {file}.", "Write the file {file} with the text {text}.",
         "Save the words {text} to {file}."]),
    "read": (
        ["Read {file}.", "What is in {file}?", "Show me the file {file}.", "Open {file} for me.",
         "What does {file} say?", "Print the contents of {file}.", "Read the file {file}.", "Show {file}.",
         "What's inside {file}?", "Open {file}.", "Let me see {file}.", "Cat {file}.", "Read me {file}, please.",
         "What are the contents of {file}?", "Look at {file} and tell me what it says.", "Show the contents of {file}.",
         "Tell me what {file} contains.",
         "Read out {file}."],
        ["Can you read {file}?", "Display {file}.", "I want to see {file}."]),
    "chain": (
        ["Convert {v} {u1} to {u2} and add {x}.", "Take {v} {u1} in {u2}, then add {x}.",
         "What is {v} {u1} in {u2} plus {x}?", "Convert {v} {u1} into {u2} and add {x} to it.",
         "First convert {v} {u1} to {u2}, then add {x}.", "Add {x} to {v} {u1} converted to {u2}.",
         "{v} {u1} in {u2}, then plus {x}.", "How many {u2} is {v} {u1}, plus {x}?",
         "Convert {v} {u1} to {u2}, then add {x} to the result.", "Change {v} {u1} into {u2} and add {x}.",
         "What's {v} {u1} in {u2}? Then add {x}.", "I have {v} {u1}; convert to {u2} and add {x}.",
         "Turn {v} {u1} into {u2}, plus {x}.", "{v} {u1} as {u2} plus {x}?",
         "Convert {v} {u1} to {u2}. Add {x} to that.", "Get {v} {u1} in {u2} and then add {x}."],
        ["{v} {u1} to {u2}, plus {x}?", "Please turn {v} {u1} into {u2} and add {x}."]),
    "parallel": (
        ["What's the weather in {city} and {city2}?", "Weather in {city} and in {city2}, please.",
         "Compare the weather in {city} and {city2}.", "How is the weather in {city} and {city2}?",
         "Check the weather for {city} and {city2}.", "Forecast for {city} and {city2}?",
         "Weather in {city} and {city2}?", "Is it sunny in {city} or {city2}?",
         "Give me the weather for {city} and {city2}.", "{city} and {city2} weather?",
         "How's the weather in {city}, and in {city2}?", "Look up the weather in {city} and {city2}.",
         "Weather for both {city} and {city2}, please.", "Tell me the weather in {city} and also {city2}."],
        ["Tell me the weather in both {city} and {city2}.", "Weather for {city} plus {city2}?"]),
    "chat": (
        ["Hi!", "Hello there.", "Thanks!", "Who are you?", "What can you do?", "Good morning!", "Hello!",
         "Thanks a lot.", "Good evening.", "What are you?", "How can you help me?", "Hey!", "Thank you so much!",
         "Good night."],
        ["Thank you.", "Hey, how are you?"]),
}
#: The newest held-out phrasings (one per single-call intent), written before any model was
#: run on them; the bundled model was trained with them held out. Reports mark them: they
#: are the fairest test of phrasing, as nobody tuned the training phrasings against them.
ADDED_HELDOUT = frozenset({
    "Is it going to rain in {city}?", "What's the {days}-day outlook for {city}?", "How much would {a} {op} {b} be?",
    "Could you turn {v} {u1} into {u2}?", "Look at the clock for {city}.", "Write down a note called {title}: {text}",
    "Save the words {text} to {file}.", "I want to see {file}."})
_CHAT_ANSWERS = {"Hi!": "Hello! How can I help?", "Hello there.": "Hello! What can I do for you?",
                 "Thanks!": "You're welcome!", "Who are you?": "I am a small assistant with tools.",
                 "What can you do?": "I can check the weather and time, calculate, convert units, and keep notes and "
                                     "files.", "Good morning!": "Good morning! How can I help?",
                 "Hello!": "Hello! How can I help?", "Thanks a lot.": "You're welcome!",
                 "Good evening.": "Good evening! What can I do for you?",
                 "What are you?": "I am a small assistant with tools.",
                 "How can you help me?": "I can check the weather and time, calculate, convert units, and keep "
                                         "notes and files.",
                 "Hey!": "Hello! How can I help?", "Thank you so much!": "You're welcome!",
                 "Good night.": "Good night!",
                 # held out: never trained on. Each answer is a trained one (a model cannot
                 # write an answer it never saw; "I'm fine, thanks!" was, and no run got it)
                 "Thank you.": "You're welcome!", "Hey, how are you?": "Hello! How can I help?"}
#: The failing-call kind: "x" is not an operator the calculator knows.
_TIMES_TRAINED = ["What is {a} x {b}?", "{a} x {b}?", "How much is {a} x {b}?", "Calculate {a} x {b}.",
                  "What's {a} x {b}?"]
_PREFIXES = ["Please, ", "Hey, ", "Hi! ", "Quick question: ", "Hello. ", "Could you help? ", "OK, ", "So, "]
_SUFFIXES = [" Thanks!", " Thank you.", " Please.", " Thanks a lot.", " :)", " Cheers."]


@dataclass(frozen=True)
class Step:
    """One model step: calls with their results, or a final answer."""

    calls: tuple[ToolCall, ...] = ()
    results: tuple[str, ...] = ()
    answer: str | None = None


@dataclass(frozen=True)
class Conversation:
    kind: str
    user: str
    steps: tuple[Step, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _pick(rng: random.Random, key: str, split: Split) -> str:
    """A phrasing for ``key``: a held-out one as written, or a trained one varied on the surface."""
    trained, held = TEMPLATES[key]
    if split == "heldout":
        return rng.choice(held)
    return _surface(rng, rng.choice(trained)) if key != "chat" else rng.choice(trained)


def _surface(rng: random.Random, t: str) -> str:
    """Casing, punctuation, a greeting or a thanks around a template (never inside a value:
    placeholders are filled after this)."""
    r = rng.random()
    if r < 0.15:
        t = t.lower()  # placeholders are lowercase already; values keep their case
    elif r < 0.25 and t[:1].isupper():
        t = t[0].lower() + t[1:]
    if rng.random() < 0.2:
        t = t.rstrip(".?!")
    if rng.random() < 0.2:
        t = rng.choice(_PREFIXES) + (t if t[:2] in ("I ", "I'") else t[0].lower() + t[1:])
    if rng.random() < 0.15 and t[-1:] in ".?!":
        t += rng.choice(_SUFFIXES)
    return t


def _place(rng: random.Random) -> str:
    name = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()
    if rng.random() < 0.1:
        name += " " + "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
    return name


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS) if rng.random() < 0.5 else "".join(rng.choice(_SYL) for _ in range(rng.randint(1, 3)))


def _num(rng: random.Random) -> float | int:
    return rng.randint(1, 999) if rng.random() < 0.7 else round(rng.uniform(0.5, 500), 1)


def _fmt(x: float) -> str:
    return f"{x:g}"


# Tool results come from the demo tools themselves (their real outputs and error messages).
def _weather(city: str, days: int) -> str:
    return str(demo.get_weather(city, days))


def _calc(a: float, op: str, b: float) -> str:
    return str(demo.calculator(f"{a} {op} {b}"))


def _convert(v: float, u1: str, u2: str) -> tuple[str, float]:
    res = str(demo.convert_units(v, u1, u2))
    return res, float(res.split(" = ")[1].split(" ")[0])


def _failure(t: Any, *args: Any) -> str:
    """The text ``Tool.execute`` feeds back when a call raises."""
    try:
        t(*args)
    except Exception as e:
        return f"{t.name} failed: {type(e).__name__}: {e}"
    raise AssertionError(f"{t.name}{args} did not fail")


def _known_city(rng: random.Random) -> str:
    name = rng.choice(sorted(demo.CITY_TIMEZONES))
    return name if rng.random() < 0.2 else name.title()


def _clock(rng: random.Random, city: str) -> tuple[str, str]:
    """A get_time result for ``city`` in the tool's format (the real one reads the clock)."""
    hh, mm = rng.randint(0, 23), rng.randint(0, 59)
    tz = demo.CITY_TIMEZONES[city.lower()]
    return f"{city}: 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {hh:02d}:{mm:02d} ({tz})", \
        f"{hh:02d}:{mm:02d}"


def conversation(rng: random.Random, split: Split) -> Conversation:
    kind = rng.choices(KINDS, weights=[0.5, 0.17, 0.1, 0.1, 0.13])[0]
    if kind == "single":
        return _single(rng, split)
    if kind == "chain":
        v, (u1, u2), x = _num(rng), rng.sample(rng.choice([d for d in _DIMS if len(d) > 1 and "C" not in d]), 2), \
            rng.randint(1, 99)
        user = _pick(rng, "chain", split).format(v=v, u1=rng.choice(_UNITS[u1]), u2=rng.choice(_UNITS[u2]), x=x)
        res, out = _convert(v, u1, u2)
        total = _calc(out, "+", x)
        return Conversation(kind, user, (
            Step((ToolCall("convert_units", {"value": v, "from_unit": u1, "to_unit": u2}),), (res,)),
            Step((ToolCall("calculator", {"expression": f"{_fmt(out)} + {x}"}),), (total,)),
            Step(answer=f"{_fmt(v)} {u1} is {_fmt(out)} {u2}; plus {x} that makes {total}.")))
    if kind == "parallel":
        c1, c2 = _place(rng), _place(rng)
        user = _pick(rng, "parallel", split).format(city=c1, city2=c2)
        r1, r2 = _weather(c1, 1), _weather(c2, 1)
        return Conversation(kind, user, (
            Step((ToolCall("get_weather", {"city": c1}), ToolCall("get_weather", {"city": c2})), (r1, r2)),
            Step(answer=f"{r1.split(': ', 2)[0]} has {r1.split(': ', 2)[2]}; {c2} has {r2.split(': ', 2)[2]}.")))
    if kind == "answer":
        user = _pick(rng, "chat", split)
        return Conversation(kind, user, (Step(answer=_CHAT_ANSWERS[user]),))
    # error: a call fails, then a corrected call or an honest answer
    if rng.random() < 0.5:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        user = (_surface(rng, rng.choice(_TIMES_TRAINED)) if split == "train" else "Compute {a} x {b} please."
                ).format(a=a, b=b)
        bad = f"{a} x {b}"
        res = _calc(a, "*", b)
        return Conversation(kind, user, (
            Step((ToolCall("calculator", {"expression": bad}),), (_failure(demo.calculator, bad),)),
            Step((ToolCall("calculator", {"expression": f"{a} * {b}"}),), (res,)),
            Step(answer=f"{a} x {b} is {res}.")))
    city = _place(rng)
    user = _pick(rng, "time", split).format(city=city)
    return Conversation(kind, user, (
        Step((ToolCall("get_time", {"city": city}),), (_failure(demo.get_time, city),)),
        Step(answer=f"Sorry, I don't know the time zone of {city}.")))


_INTENT_WEIGHTS = {"weather": 1.0, "weather_days": 1.0, "calc": 1.5, "convert": 1.0, "time": 1.0, "note": 1.3,
                   "write": 1.3, "read": 1.0}


def _single(rng: random.Random, split: Split) -> Conversation:
    # Intents that copy more (numbers, several words) are drawn more often.
    intent = rng.choices(list(_INTENT_WEIGHTS), weights=list(_INTENT_WEIGHTS.values()))[0]
    if intent in ("weather", "weather_days"):
        city = _place(rng)
        days = rng.randint(2, 5) if intent == "weather_days" else 1
        template = _pick(rng, intent, split)
        user = template.format(city=city, days=days)
        args: dict[str, Any] = {"city": city, **({"days": days} if intent == "weather_days" else {})}
        res = _weather(city, days)
        first = res.split("; ")[0].split(": ", 2)[2]
        call, answer = ToolCall("get_weather", args), f"In {city}: {first}."
    elif intent == "calc":
        a, b, op = _num(rng), _num(rng), rng.choice(list(_OPS))
        template = _pick(rng, "calc", split)
        user = template.format(a=a, b=b, op=rng.choice(_OPS[op]))
        res = _calc(a, op, b)
        call, answer = ToolCall("calculator", {"expression": f"{a} {op} {b}"}), f"{a} {op} {b} = {res}."
    elif intent == "convert":
        u1, u2 = rng.sample(rng.choice(_DIMS), 2)
        v = _num(rng)
        template = _pick(rng, "convert", split)
        user = template.format(v=v, u1=rng.choice(_UNITS[u1]), u2=rng.choice(_UNITS[u2]))
        res, _ = _convert(v, u1, u2)
        call, answer = ToolCall("convert_units", {"value": v, "from_unit": u1, "to_unit": u2}), f"{res}."
    elif intent == "time":
        city = _known_city(rng)  # the tool knows a fixed list; others are the "error" kind
        template = _pick(rng, "time", split)
        user = template.format(city=city)
        res, clock = _clock(rng, city)
        call, answer = ToolCall("get_time", {"city": city}), f"It is {clock} in {city}."
    elif intent == "note":
        title, text = _word(rng), " ".join(_word(rng) for _ in range(rng.randint(1, 4)))
        template = _pick(rng, "note", split)
        user = template.format(title=title, text=text)
        n = rng.randint(1, 9)
        res = f"saved note {n}: {title}"
        call, answer = ToolCall("add_note", {"title": title, "text": text}), f"Saved note {n}, {title}."
    elif intent == "write":
        file, text = _word(rng) + ".txt", " ".join(_word(rng) for _ in range(rng.randint(1, 4)))
        template = _pick(rng, "write", split)
        user = template.format(file=file, text=text)
        res = f"wrote {len(text)} characters to {file}"
        call, answer = ToolCall("write_file", {"path": file, "content": text}), f"Wrote {file}."
    else:
        file, text = _word(rng) + ".txt", " ".join(_word(rng) for _ in range(rng.randint(1, 5)))
        template = _pick(rng, "read", split)
        user = template.format(file=file)
        res = text
        call, answer = ToolCall("read_file", {"path": file}), f"{file} says: {text}"
    return Conversation("single", user, (Step((call,), (res,)), Step(answer=answer)),
                        {"intent": intent, "template": template})


def conversations(n: int, seed: int, split: Split) -> Iterator[Conversation]:
    """``n`` conversations; the same ``seed`` and ``split`` always give the same ones."""
    rng = random.Random(f"{seed}|{split}")
    for _ in range(n):
        yield conversation(rng, split)


def corpus_text(n: int, seed: int) -> Iterator[str]:
    """Plain text of rendered conversations, for training the tokenizer."""
    from ..protocol import Protocol
    from .render import render_conversation

    p = Protocol("gemma4")
    for conv in conversations(n, seed, "train"):
        context, outputs = render_conversation(p, conv)
        yield "".join(t for t, _ in context)
        for out in outputs:
            yield out
