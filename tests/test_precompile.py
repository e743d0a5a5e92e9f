"""Compiling the numba kernels ahead of their first calls, in parallel (agentloop.precompile)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import agentloop.precompile as pc
from agentloop.errors import KernelCompileError

#: two cheap kernels in different cache files (a fresh cache compiles them in ~1 s)
SMALL = ("_step", "below_normal")


#: In a ``run_fresh`` script (placed 8 spaces in): ``compiled`` lists the agentloop functions
#: numba compiles from there on.
AGENTLOOP_COMPILES = textwrap.indent(textwrap.dedent("""
    from numba.core import event
    compiled = []
    class Names(event.Listener):
        def on_start(self, ev):
            f = ev.data["dispatcher"].py_func
            if f.__module__.startswith("agentloop"):
                compiled.append(f.__qualname__)
        def on_end(self, ev):
            pass
    event.register("numba:compile", Names())
""").strip(), " " * 8).lstrip()


def small_kernels() -> list[pc.RecordedKernel]:
    kernels = [k for k in pc.recorded_kernels() if k.name in SMALL]
    assert len(kernels) == 2
    return kernels


def run_fresh(code: str, cache: Path, *args: str, grammars: Path | None = None, **env_vars: str) -> str:
    """``code`` in a new Python process whose numba cache is ``cache`` (and agentloop's
    grammar cache ``grammars``; more environment in ``env_vars``); -> its stdout."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), **env_vars}
    if grammars is not None:
        env["AGENTLOOP_CACHE_DIR"] = str(grammars)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_recording_names_kernels_the_package_defines() -> None:
    """Each recorded kernel resolves to a numba dispatcher taking as many arguments as its
    signatures give, and each signature reads back to numba types and to the same spec:
    a kernel renamed or given another argument fails here (re-record:
    ``python -m agentloop.precompile --record``)."""
    kernels = pc.recorded_kernels()
    assert len(kernels) >= 30
    assert any(k.demo for k in kernels) and not all(k.demo for k in kernels)
    for k in kernels:
        d = k.dispatcher()
        assert d is not None, f"{k.module}.{k.name}[{k.key}] is no numba kernel any more"
        params = inspect.signature(d.py_func).parameters
        for sig in k.signatures:
            assert len(sig) == len(params), f"{k.name}: recorded with {len(sig)} arguments, defined with {len(params)}"
            assert tuple(pc._type_spec(pc._numba_type(spec)) for spec in sig) == tuple(
                pc._as_list(spec) for spec in sig)
        assert pc.RecordedKernel.from_json(json.loads(json.dumps(k.to_json()))) == k


def test_the_demo_kernels_include_the_denoising_step() -> None:
    demo = {k.name for k in pc.recorded_kernels() if k.demo}
    assert {"_scan_sums_x", "_write_marginals", "_sample_tokens", "_subsets"} <= demo


def test_a_kernel_is_at_most_a_demo_entry_and_another() -> None:
    """A kernel the demo and the rest of the workload call with different signatures is
    two entries whose signatures do not overlap: the first run compiles the demo's alone."""
    entries: dict[tuple[str, str, str], list[pc.RecordedKernel]] = {}
    for k in pc.recorded_kernels():
        entries.setdefault(k.identity, []).append(k)
    split = 0
    for name, ks in entries.items():
        assert sorted(k.demo for k in ks) in ([False], [True], [False, True]), name
        if len(ks) == 2:
            split += 1
            assert not set(ks[0].signatures) & set(ks[1].signatures), name
    assert split >= 1  # (the workload's text-where-call steps call demo kernels with other arguments)


def test_the_recording_holds_the_log_space_steps() -> None:
    """The kernels of a step whose weight leaves float64's range (a text answer where a
    call is forced, at a low temperature) are recorded, for ``agentloop precompile``: a
    first such step would otherwise compile for ~40 s in the middle of a run."""
    recorded = {k.name for k in pc.recorded_kernels() if not k.demo}
    assert {"dense_suffix_bounds", "kept_log_factors", "kept_log_backward", "_DENSE_LOG_FACTORS",
            "log_sums_by_group", "log_sample_atoms"} <= recorded


def test_the_recording_holds_no_strided_arrays() -> None:
    """Every recorded array argument is contiguous (C or F layout): each canvas of a batch
    gets the layouts a lone canvas does, so no kernel needs a second, strided ('A')
    build (with 17 such signatures the rest of ``agentloop precompile`` took 85 s on 2
    cores, without them 62)."""
    strided = [(k.name, i) for k in pc.recorded_kernels() for sig in k.signatures for i, spec in enumerate(sig)
               if spec[0] == "array" and spec[3] not in ("C", "F")]
    assert strided == []


def test_shares_balance_the_recorded_seconds() -> None:
    kernels = pc.recorded_kernels()
    shares = pc._shares(kernels, 3)
    assert len(shares) == 3
    assert sorted(k.identity for s in shares for k in s) == sorted(k.identity for k in kernels)
    loads = [sum(k.seconds for k in s) for s in shares]
    assert max(loads) - min(loads) <= max(k.seconds for k in kernels) + 2.0
    assert pc._shares(kernels[:1], 8) == [kernels[:1]]
    assert 1 <= pc.default_processes() <= pc.MAX_PROCESSES


def test_cache_saves_wait_for_the_lock(tmp_path: Path) -> None:
    """While one process holds the lock, another's numba cache save waits: two processes
    saving one function's index at once could lose an entry."""
    (tmp_path / "tiny_kernel.py").write_text("import numba\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n")
    lock = tmp_path / "lock"
    lock.touch()
    code = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import agentloop.precompile as pc
        import tiny_kernel
        print("ready", flush=True)
        with pc._cache_saves_locked(pc.Path({str(lock)!r})):
            tiny_kernel.f(1)
        print("saved", flush=True)
    """
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    with pc._locked(lock):
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            with pytest.raises(subprocess.TimeoutExpired):  # (compiling f takes ~0.2 s: it waits on the save)
                child.wait(timeout=3)
        except BaseException:
            child.kill()
            child.wait()
            raise
    assert child.wait(timeout=60) == 0
    assert child.stdout.read().strip() == "saved"
    assert list((tmp_path / "numba").rglob("*.nbi"))


def test_a_failing_process_raises_with_its_error_and_the_others_finish(tmp_path: Path) -> None:
    code = """
        import dataclasses
        import agentloop.precompile as pc
        from agentloop.errors import KernelCompileError
        by_name = {k.name: k for k in pc.recorded_kernels()}
        step, below = by_name["_step"], by_name["below_normal"]
        # below_normal with _step's argument types: numba cannot type it, in the second process
        bad = dataclasses.replace(below, signatures=step.signatures, seconds=0.0)
        good = dataclasses.replace(step, seconds=5.0)
        try:
            pc.precompile_kernels([good, bad], processes=2)
        except KernelCompileError as e:
            print("raised", "process 1, holding below_normal" in str(e), "Signature mismatch" in str(e))
    """
    assert run_fresh(code, tmp_path).split() == ["raised", "True", "True"]
    # the other process's share is in the cache (a new process finds it there)
    count = "import agentloop.precompile as pc; print(len(pc.missing_kernels([k for k in pc.recorded_kernels() " \
            "if k.name == '_step'])))"
    assert run_fresh(count, tmp_path).strip() == "0"


def test_an_interrupted_precompile_leaves_no_process_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # (the worker's cache)
    started: list[pc._Worker] = []
    real = pc._Worker

    def worker() -> pc._Worker:
        started.append(real())
        return started[-1]

    def interrupted(share: list[pc.RecordedKernel]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pc, "_Worker", worker)
    monkeypatch.setattr(pc, "_compile", interrupted)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        pc.precompile_kernels(small_kernels(), processes=2)
    assert time.perf_counter() - t0 < 5  # (not waiting for the worker's compile)
    assert len(started) == 1
    w = started[0]
    assert w.process is not None and w.process.returncode == (-signal.SIGKILL if os.name == "posix" else 1)
    assert w.log.closed


def test_a_worker_whose_parent_died_ends_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's end of the worker's stdin closing (as when the parent is killed) ends
    the worker at once, before its share's compiles."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    w = pc._Worker()
    try:
        w.start(pc.recorded_kernels(), lock)  # (every kernel: minutes, were it to compile them)
        assert w.process is not None and w.process.stdin is not None
        w.process.stdin.close()
        assert w.process.wait(timeout=60) == 3, w.error_output()
    finally:
        w.stop()


def test_a_kernel_numba_does_not_cache_is_never_missing() -> None:
    import numba

    @numba.njit(cache=False)
    def plus_one(x: int) -> int:
        return x + 1

    assert pc._cached(plus_one, (numba.int64,))
    assert not pc._caches(plus_one)


def test_nothing_to_do_where_nothing_is_missing() -> None:
    report = pc.precompile_kernels([], processes=4)
    assert (report.compiled, report.processes) == (0, 0)


def test_an_unknown_spec_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown kind of recorded argument type"):
        pc._numba_type(("record", "x"))


def test_cli_precompile_fills_a_fresh_cache_from_two_processes(tmp_path: Path) -> None:
    """``agentloop precompile`` against a recording of two kernels: compiles them in two
    processes, then finds nothing to do; a new process finds both in the cache (the
    other process's share too)."""
    recording = tmp_path / "kernels.json"
    recording.write_text(json.dumps({"kernels": [k.to_json() for k in small_kernels()]}))
    code = f"""
        import agentloop.precompile as pc
        from click.testing import CliRunner
        from agentloop.cli import main
        pc.SIGNATURES_FILE = pc.Path({str(recording)!r})
        for _ in range(2):
            r = CliRunner().invoke(main, ["precompile", "--processes", "2"])
            assert r.exit_code == 0, r.output
            print(r.stdout.strip().splitlines()[-1])
    """
    lines = run_fresh(code, tmp_path / "numba").strip().splitlines()
    assert lines[0].startswith("compiled 2 kernels in 2 process(es)"), lines
    assert lines[1].startswith("nothing to compile"), lines
    count = ("import agentloop.precompile as pc; "
             f"print(len(pc.missing_kernels(pc.recorded_kernels({str(recording)!r}))))")
    assert run_fresh(count, tmp_path / "numba").strip() == "0"


def test_demo_goes_on_where_precompiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import agentloop.cli

    def failing(demo_only: bool, processes: int | None = None, note: str = "") -> None:
        raise KernelCompileError("compiling kernels failed in 1 of 2 process(es): out of memory")

    monkeypatch.setattr(agentloop.cli, "_precompile", failing)
    r = CliRunner().invoke(agentloop.cli.main, ["demo", "--random", "--steps", "1", "--canvas", "16"])
    assert r.exit_code == 0, r.output
    assert ("warning: precompiling kernels failed, they compile at their first calls instead: compiling kernels "
            "failed in 1 of 2 process(es): out of memory") in r.output


def test_cli_precompile_says_where_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import agentloop.cli

    def failing(kernels: list[pc.RecordedKernel], processes: int | None = None) -> None:
        raise KernelCompileError("compiling kernels failed in 1 of 1 process(es): boom")

    monkeypatch.setattr(pc, "missing_kernels", lambda kernels: small_kernels())
    monkeypatch.setattr(pc, "precompile_kernels", failing)
    r = CliRunner().invoke(agentloop.cli.main, ["precompile", "--processes", "8"])
    assert r.exit_code == 1
    assert "compiling 2 numba kernels for this CPU in 2 process(es): stopped after" in r.output
    assert "error: compiling kernels failed in 1 of 1 process(es): boom" in r.output


def test_cli_precompile_without_the_jit(tmp_path: Path) -> None:
    code = """
        from click.testing import CliRunner
        from agentloop.cli import main
        r = CliRunner().invoke(main, ["precompile"])
        print(r.exit_code, r.output)
    """
    out = run_fresh(code, tmp_path, NUMBA_DISABLE_JIT="1")
    assert out.startswith("0 nothing to compile: numba's JIT is disabled"), out


@pytest.mark.slow
def test_a_fresh_install_demo_compiles_nothing_after_precompiling(tmp_path: Path) -> None:
    """The recording is complete for the demo: after ``agentloop precompile --demo-only``
    into an empty cache, the demo compiles no kernel of agentloop's (~30 s on 2 cores)."""
    code = f"""
        from click.testing import CliRunner
        from agentloop.cli import main
        r = CliRunner().invoke(main, ["precompile", "--demo-only"])
        assert r.exit_code == 0, r.output
        {AGENTLOOP_COMPILES}
        r = CliRunner().invoke(main, ["demo"])
        assert r.exit_code == 0, r.output
        print(sorted(set(compiled)))
    """
    assert run_fresh(code, tmp_path / "numba", grammars=tmp_path / "grammars").strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_text_where_a_call_is_forced_compiles_nothing_after_precompiling(tmp_path: Path) -> None:
    """After ``agentloop precompile`` into an empty cache, steps where the model is sure of
    a text answer while the canvas continues a call (the demo tools, 3 and 5 tools, at
    low temperatures and at 1) compile no kernel of agentloop's (~2-3 min on 2 cores)."""
    code = f"""
        import json
        import torch
        from click.testing import CliRunner
        import agentloop.precompile as pc
        from agentloop.cli import DEMO_TOOLS, main
        from agentloop.grammar import byte_tokenizer, compile_tools
        r = CliRunner().invoke(main, ["precompile"])
        assert r.exit_code == 0, r.output
        {AGENTLOOP_COMPILES}
        tok = byte_tokenizer()
        schemas = json.loads((pc.SIGNATURES_FILE.parent / "tool_schemas.json").read_text())
        for tools in (DEMO_TOOLS, schemas[:3], schemas[:5]):
            g = compile_tools(tools, tok, "gemma4")
            for temperature in (1.0, 0.5, 0.2):
                g.denoise_step(**pc._text_where_call(g, tok, temperature))
        print(sorted(set(compiled)))
    """
    assert run_fresh(code, tmp_path / "numba", grammars=tmp_path / "grammars").strip().splitlines()[-1] == "[]"
