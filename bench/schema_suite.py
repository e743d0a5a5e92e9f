"""Run the JSON-Schema-Test-Suite (draft 2020-12) against the grammar's schema compiler.

For every test group the schema is compiled (``compile_schema``, json wire format,
``SchemaOptions(strict=False)`` so that a missing ``additionalProperties`` means what the
spec says) against the tiny offline byte tokenizer. A group whose schema raises
``SchemaError`` is *unsupported* (its keyword is recorded); otherwise every test case asks
``accepts_json`` for the canonical spelling of its instance:

- an invalid instance accepted is a soundness failure (must be 0);
- a valid instance rejected is a completeness failure, acceptable only for the documented
  restrictions in ``tests/test_json_schema_suite.py`` (``KNOWN_RESTRICTIONS``).

Accepted instances are also checked with ``jsonschema`` (format assertion on): the grammar
must be sound for the Python validator as well as for the suite.

Usage::

    python bench/schema_suite.py            # writes bench/results/json_schema_suite.{json,md}

The suite is found beside the repository (``../shared/data/JSON-Schema-Test-Suite``) or at
``$AGENTLOOP_JSON_SCHEMA_SUITE``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jsonschema

from agentloop.errors import SchemaError
from agentloop.grammar import SchemaOptions, byte_tokenizer, compile_schema, load_wire_format
from agentloop.grammar.fsa import to_dfa
from agentloop.grammar.schema import SchemaCompiler

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OPTIONS = SchemaOptions(strict=False)

# Optional files run besides tests/draft2020-12/*.json: the regex dialect, big numbers,
# and the formats (format assertion), unsupported ones included so they are listed.
OPTIONAL_FILES = (
    "optional/ecmascript-regex.json",
    "optional/non-bmp-regex.json",
    "optional/bignum.json",
    "optional/float-overflow.json",
    "optional/anchor.json",
    "optional/id.json",
    "optional/unknownKeyword.json",
    "optional/refOfUnknownKeyword.json",
    "optional/no-schema.json",
)
FORMAT_FILES = (
    "date", "time", "date-time", "duration", "email", "idn-email", "hostname", "idn-hostname",
    "ipv4", "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uri-template", "uuid",
    "json-pointer", "relative-json-pointer", "regex", "unknown",
)


def suite_root() -> Path:
    env = os.environ.get("AGENTLOOP_JSON_SCHEMA_SUITE")
    return Path(env) if env else REPO.parent / "shared" / "data" / "JSON-Schema-Test-Suite"


def suite_files(root: Path) -> list[str]:
    """Paths (relative to tests/draft2020-12) of every file that exists, in report order."""
    base = root / "tests" / "draft2020-12"
    names = sorted(p.name for p in base.glob("*.json"))
    names += [n for n in OPTIONAL_FILES if (base / n).is_file()]
    names += [f"optional/format/{n}.json" for n in FORMAT_FILES if (base / "optional" / "format" / f"{n}.json").is_file()]
    return names


def load_groups(root: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((root / "tests" / "draft2020-12" / name).read_text("utf-8"))


@dataclass
class CaseResult:
    test: str
    valid: bool
    accepted: bool
    jsonschema_valid: bool | None  # None: jsonschema could not judge (remote $ref)

    @property
    def kind(self) -> str:
        if self.accepted == self.valid:
            return "pass"
        return "invalid accepted" if self.accepted else "valid rejected"


@dataclass
class GroupResult:
    file: str
    group: str
    supported: bool
    keyword: str | None = None  # of the SchemaError for an unsupported group
    pointer: str | None = None
    message: str | None = None
    empty: bool = False  # the schema admits no value (compiles to the empty language)
    seconds: float = 0.0
    cases: list[CaseResult] = field(default_factory=list)


_TOKENIZER: Any = None


def _tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = byte_tokenizer()
    return _TOKENIZER


def _jsonschema_valid(schema: Any, data: Any) -> bool | None:
    try:
        v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        return bool(v.is_valid(data))
    except Exception:  # remote refs, unknown metaschemas: no verdict
        return None


def run_group(file: str, group: dict[str, Any]) -> GroupResult:
    """Compile one group's schema and run its cases."""
    t0 = time.perf_counter()
    schema = group["schema"]
    res = GroupResult(file, group["description"], supported=True)
    grammar: Any = None
    try:
        grammar = compile_schema(schema, _tokenizer(), "json", options=OPTIONS)
    except SchemaError as e:
        # compile_schema refuses a schema that admits no value at all; that is a
        # supported schema whose language is empty, not an unsupported one.
        empty = False
        if e.keyword is None:
            try:
                wf = load_wire_format("json")
                empty = to_dfa(SchemaCompiler(schema, wf, OPTIONS).node(), wf.n_symbols).is_empty()
            except SchemaError:
                empty = False
        if not empty:
            res.supported = False
            res.keyword = e.keyword or "(schema)"
            res.pointer = e.pointer
            res.message = str(e)
            res.seconds = time.perf_counter() - t0
            return res
        res.empty = True
    for case in group["tests"]:
        accepted = bool(grammar.accepts_json(case["data"])) if grammar is not None else False
        js = _jsonschema_valid(schema, case["data"]) if accepted else None
        res.cases.append(CaseResult(case["description"], bool(case["valid"]), accepted, js))
    res.seconds = time.perf_counter() - t0
    return res


def iter_groups(root: Path, files: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in files if files is not None else suite_files(root):
        for group in load_groups(root, name):
            yield name, group


def known_restrictions() -> dict[tuple[str, str, str], str]:
    """The documented restrictions (allow-list) kept with the test."""
    path = REPO / "tests" / "test_json_schema_suite.py"
    spec = importlib.util.spec_from_file_location("_suite_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.KNOWN_RESTRICTIONS)


def restriction_for(known: dict[tuple[str, str, str], str], file: str, group: str, test: str) -> str | None:
    return known.get((file, group, test)) or known.get((file, group, "*"))


def summarize(results: list[GroupResult], known: dict[tuple[str, str, str], str]) -> dict[str, Any]:
    per_file: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    unsupported: list[dict[str, Any]] = []
    for r in results:
        f = per_file.setdefault(r.file, {
            "file": r.file, "groups_supported": 0, "groups_unsupported": 0, "unsupported_keywords": Counter(),
            "cases": 0, "cases_passed": 0, "cases_failed": 0, "invalid_accepted": 0, "valid_rejected": 0,
            "valid_rejected_documented": 0, "cases_unsupported": 0, "jsonschema_disagrees": 0, "seconds": 0.0,
        })
        f["seconds"] += r.seconds
        if not r.supported:
            f["groups_unsupported"] += 1
            f["unsupported_keywords"][r.keyword] += 1
            unsupported.append({"file": r.file, "group": r.group, "keyword": r.keyword, "pointer": r.pointer,
                                "message": r.message})
            continue
        f["groups_supported"] += 1
        for c in r.cases:
            f["cases"] += 1
            if c.kind == "pass":
                f["cases_passed"] += 1
            else:
                f["cases_failed"] += 1
            if c.kind == "invalid accepted":
                f["invalid_accepted"] += 1
            reason = None
            if c.kind == "valid rejected":
                f["valid_rejected"] += 1
                reason = restriction_for(known, r.file, r.group, c.test)
                f["valid_rejected_documented"] += reason is not None
            if c.accepted and c.jsonschema_valid is False:
                f["jsonschema_disagrees"] += 1
            if c.kind != "pass" or (c.accepted and c.jsonschema_valid is False):
                failures.append({"file": r.file, "group": r.group, "test": c.test, "kind": c.kind,
                                 "jsonschema_valid": c.jsonschema_valid, "documented": reason})
    files = []
    for f in per_file.values():
        f["unsupported_keywords"] = dict(f["unsupported_keywords"])
        f["seconds"] = round(f["seconds"], 3)
        files.append(f)
    totals = {k: sum(f[k] for f in files) for k in (
        "groups_supported", "groups_unsupported", "cases", "cases_passed", "cases_failed", "invalid_accepted",
        "valid_rejected", "valid_rejected_documented", "cases_unsupported", "jsonschema_disagrees")}
    totals["seconds"] = round(sum(f["seconds"] for f in files), 3)
    return {"totals": totals, "files": files, "failures": failures, "unsupported": unsupported}


def _suite_version(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return "unknown (not a git checkout)"


def to_markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [
        "# JSON-Schema-Test-Suite (draft 2020-12) against the grammar compiler",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}, Python {report['python']}, jsonschema {report['jsonschema']}",
        f"- suite: `{report['suite']}` ({report['suite_version']})",
        f"- options: `{report['options']}`, wire format json, byte tokenizer; {t['seconds']:.1f} s",
        "",
        "A group is *unsupported* when compiling its schema raises `SchemaError` (keyword "
        "listed). *invalid accepted* is a soundness failure and must be 0; *valid rejected* "
        "counts instances the grammar does not generate, *documented* those under a "
        "restriction listed in `tests/test_json_schema_suite.py`. *jsonschema rejects* "
        "counts accepted instances that `jsonschema` (format assertion on) calls invalid.",
        "",
        f"**Totals:** {t['groups_supported']} groups supported, {t['groups_unsupported']} unsupported; "
        f"{t['cases_passed']}/{t['cases']} cases of supported groups pass; "
        f"invalid accepted: **{t['invalid_accepted']}**; valid rejected: {t['valid_rejected']} "
        f"({t['valid_rejected_documented']} documented); jsonschema rejects: {t['jsonschema_disagrees']}; "
        f"{t['cases_unsupported']} cases sit in unsupported groups (not run).",
        "",
        "| file | groups ok | groups unsupported | cases passed | invalid accepted | valid rejected (documented) | jsonschema rejects | cases not run | unsupported keywords |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for f in report["files"]:
        kws = ", ".join(f"{k} ({n})" for k, n in sorted(f["unsupported_keywords"].items()))
        lines.append(
            f"| {f['file']} | {f['groups_supported']} | {f['groups_unsupported']} | {f['cases_passed']}/{f['cases']} "
            f"| {f['invalid_accepted']} | {f['valid_rejected']} ({f['valid_rejected_documented']}) "
            f"| {f['jsonschema_disagrees']} | {f['cases_unsupported']} | {kws} |"
        )
    lines += ["", "## Cases that do not pass", ""]
    if not report["failures"]:
        lines.append("None.")
    else:
        lines += ["| file | group | test | kind | restriction |", "|---|---|---|---|---|"]
        for x in report["failures"]:
            kind = x["kind"] if x["kind"] != "pass" else "accepted, jsonschema rejects"
            lines.append(f"| {x['file']} | {_md(x['group'])} | {_md(x['test'])} | {kind} | {_md(x['documented'] or '**undocumented**')} |")
    lines += ["", "## Unsupported groups", "", "| file | group | keyword | pointer |", "|---|---|---|---|"]
    for u in report["unsupported"]:
        lines.append(f"| {u['file']} | {_md(u['group'])} | `{u['keyword']}` | `{u['pointer']}` |")
    return "\n".join(lines) + "\n"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str]) -> int:
    # The on-disk grammar cache is keyed by schema, not by compiler version: a run must
    # measure the compiler as it is now, not grammars an older one left there.
    os.environ["AGENTLOOP_CACHE_DIR"] = "off"
    root = suite_root()
    if not (root / "tests" / "draft2020-12").is_dir():
        print(f"JSON-Schema-Test-Suite not found at {root} (set AGENTLOOP_JSON_SCHEMA_SUITE)", file=sys.stderr)
        return 2
    files = suite_files(root)
    if argv:  # a subset, by substring of the file name (results are not written)
        files = [f for f in files if any(a in f for a in argv)]
    results: list[GroupResult] = []
    for name in files:
        t0 = time.perf_counter()
        results.extend(run_group(name, g) for g in load_groups(root, name))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    report = summarize(results, known_restrictions())
    # cases in unsupported groups, so the table shows how much of each file is not run
    for f in report["files"]:
        f["cases_unsupported"] = sum(len(g["tests"]) for g in load_groups(root, f["file"])) - f["cases"]
    report["totals"]["cases_unsupported"] = sum(f["cases_unsupported"] for f in report["files"])
    report.update({
        "command": "python bench/schema_suite.py" + ("".join(" " + a for a in argv)),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "jsonschema": _package_version("jsonschema"),
        "suite": str(root),
        "suite_version": _suite_version(root),
        "options": repr(OPTIONS),
    })
    print(to_markdown(report) if argv else "", end="")
    t = report["totals"]
    print(f"groups {t['groups_supported']} supported / {t['groups_unsupported']} unsupported; "
          f"cases {t['cases_passed']}/{t['cases']}; invalid accepted {t['invalid_accepted']}; "
          f"valid rejected {t['valid_rejected']} ({t['valid_rejected_documented']} documented); "
          f"jsonschema rejects {t['jsonschema_disagrees']}", file=sys.stderr)
    if not argv:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "json_schema_suite.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "json_schema_suite.md").write_text(to_markdown(report))
        print(f"wrote {RESULTS / 'json_schema_suite.md'}", file=sys.stderr)
    return 1 if t["invalid_accepted"] or t["jsonschema_disagrees"] else 0


def _package_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
