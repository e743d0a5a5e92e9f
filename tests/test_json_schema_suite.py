"""The JSON-Schema-Test-Suite (draft 2020-12) as the peer suite of the schema compiler.

For every test group whose schema compiles (unsupported keywords raise ``SchemaError`` and
are reported by ``bench/schema_suite.py``, not failed here):

- no invalid instance is accepted (soundness: a hard requirement, no exceptions), and no
  accepted instance is rejected by ``jsonschema`` with format assertion on;
- every valid instance is accepted, except the documented restrictions listed in
  ``KNOWN_RESTRICTIONS`` below.

The suite lives beside the repository (``../shared/data/JSON-Schema-Test-Suite``) or at
``$AGENTLOOP_JSON_SCHEMA_SUITE``; without it the tests are skipped.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from agentloop.grammar import check_schema

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "schema_suite.py"

# (file, group description, test description) -> why the grammar does not generate that
# valid instance. A test description "*" covers every test of the group. Each entry is a
# restriction the compiler takes on purpose (it never accepts an invalid instance to gain
# one of these back).
_FORMAT_ANNOTATION = (
    "format is asserted: the grammar generates only strings of the format, while the spec's "
    "default vocabulary reads format as an annotation"
)
_DIALECT = (
    "patterns hold only strings both ECMA-262 and Python's re (what jsonschema runs) match; "
    "the dialects disagree on \\d \\w \\s for non-ASCII characters"
)
_LEAP_SECOND = "leap seconds are left out: jsonschema's date-time / time checker (rfc3339-validator) rejects them"
_A_LABEL = (
    "host name labels with '--' in positions 3-4 (IDNA A-labels, 'xn--') are left out: "
    "Punycode validity is not a regular language"
)
# The restrictions a schema's bounds make (check_schema lists them as Narrowings),
# against the readings above, where the grammar takes what both readings accept.
_NESTING = "nesting under a true schema is bounded by SchemaOptions.any_value_depth"
_ONE_UNNAMED_KEY = "inside a negation an object carries at most one key the schema never names"
NARROWINGS = {_NESTING, _ONE_UNNAMED_KEY}
KNOWN_RESTRICTIONS: dict[tuple[str, str, str], str] = {
    # format.json: one group per format, each with an "only an annotation by default" case.
    **{("format.json", f"{name} format", f"invalid {name} string is only an annotation by default"): _FORMAT_ANNOTATION
       for name in ("email", "ipv4", "ipv6", "hostname", "date", "date-time", "time", "json-pointer",
                    "relative-json-pointer", "iri", "iri-reference", "uri", "uri-reference", "uri-template",
                    "uuid", "duration")},
    # Values nested deeper than SchemaOptions.any_value_depth (2) under a `true` schema
    # (here: items of an array without an `items` schema) are not generated.
    ("uniqueItems.json", "uniqueItems=false validation", "unique array of nested objects is valid"): _NESTING,
    ("uniqueItems.json", "uniqueItems=false validation", "non-unique array of nested objects is valid"): _NESTING,
    # Inside a negation (not / oneOf / if / dependent*) objects are spelled canonically,
    # with at most one key the schema never names (more could repeat one another, which
    # a regular language cannot rule out, and a repeated key would defeat the negation).
    ("dependentSchemas.json", "dependencies with escaped characters", "quoted tab"): _ONE_UNNAMED_KEY,
    # The compiler always applies the validation vocabulary.
    ("vocabulary.json", "schema that uses custom metaschema with with no validation vocabulary",
     "no validation: invalid number, but it still validates"):
        "$vocabulary is not honoured: validation keywords always apply",
    ("optional/ecmascript-regex.json", "ECMA 262 \\D matches everything but ascii digits",
     "NKO DIGIT ZERO matches (unlike e.g. Python)"): _DIALECT,
    ("optional/ecmascript-regex.json", "ECMA 262 \\D matches everything but ascii digits",
     "NKO DIGIT ZERO (as \\u escape) matches"): _DIALECT,
    ("optional/ecmascript-regex.json", "ECMA 262 \\W matches everything but ascii letters",
     "latin-1 e-acute matches (unlike e.g. Python)"): _DIALECT,
    ("optional/ecmascript-regex.json", "ECMA 262 \\s matches whitespace", "zero-width whitespace matches"): _DIALECT,
    **{("optional/format/time.json", "validation of time strings", t): _LEAP_SECOND for t in (
        "a valid time string with leap second, Zulu", "valid leap second, zero time-offset",
        "valid leap second, positive time-offset", "valid leap second, large positive time-offset",
        "valid leap second, negative time-offset", "valid leap second, large negative time-offset")},
    **{("optional/format/date-time.json", "validation of date-time strings", t): _LEAP_SECOND for t in (
        "a valid date-time with a leap second, UTC", "a valid date-time with a leap second, with minus offset")},
    ("optional/format/email.json", "validation of e-mail addresses", "an IPv6-address-literal after the @ is valid"):
        "IPv6 address literals in e-mail addresses are left out (they double the automaton of every e-mail field)",
    ("optional/format/hostname.json", "validation of A-label (punycode) host names", "*"): _A_LABEL,
    ("optional/format/relative-json-pointer.json", "validation of Relative JSON Pointers (RJP)",
     "multi-digit prefix with a zero followed by another digit"):
        "jsonschema's relative-json-pointer checker rejects a '0' followed by a digit in the prefix",
}


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("agentloop_bench_schema_suite", _BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
_ROOT = bench.suite_root()
_HAVE_SUITE = (_ROOT / "tests" / "draft2020-12").is_dir()
_GROUPS = list(bench.iter_groups(_ROOT)) if _HAVE_SUITE else []


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # The grammar disk cache is keyed by schema, not compiler version: test the compiler.
    monkeypatch.setenv("AGENTLOOP_CACHE_DIR", "off")


@pytest.mark.skipif(not _HAVE_SUITE, reason=f"JSON-Schema-Test-Suite not found at {_ROOT}")
@pytest.mark.parametrize(
    ("file", "group"), _GROUPS or [("", {})], ids=[f"{f}::{g['description']}" for f, g in _GROUPS] or ["suite-missing"]
)
def test_group(file: str, group: dict[str, Any]) -> None:
    result = bench.run_group(file, group)
    if not result.supported:
        pytest.skip(f"unsupported: {result.keyword} at {result.pointer}")
    unsound = [c.test for c in result.cases if c.kind == "invalid accepted"]
    assert not unsound, f"invalid instances accepted: {unsound}"
    disagree = [c.test for c in result.cases if c.accepted and c.jsonschema_valid is False]
    assert not disagree, f"accepted instances jsonschema rejects: {disagree}"
    why = {c.test: bench.restriction_for(KNOWN_RESTRICTIONS, file, group["description"], c.test)
           for c in result.cases if c.kind == "valid rejected"}
    missing = [t for t, reason in why.items() if reason is None]
    assert not missing, f"valid instances rejected without a documented restriction: {missing}"
    if NARROWINGS & set(why.values()):  # a bound the schema meets: check_schema says where
        assert check_schema(group["schema"], "json", options=bench.OPTIONS), "no Narrowing listed"


@pytest.mark.skipif(not _HAVE_SUITE, reason=f"JSON-Schema-Test-Suite not found at {_ROOT}")
def test_allow_list_is_current() -> None:
    """Every allow-list entry names a real group (and test), so stale entries surface."""
    tests = {(f, g["description"], t["description"]) for f, g in _GROUPS for t in g["tests"]}
    groups = {(f, g["description"]) for f, g in _GROUPS}
    stale = [k for k in KNOWN_RESTRICTIONS if (k[:2] not in groups if k[2] == "*" else k not in tests)]
    assert not stale, f"allow-list entries that match no suite case: {stale}"
