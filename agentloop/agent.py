"""The agent loop: render the conversation, let the engine write calls or an answer under
the tools' grammar, run the calls, feed the results back, repeat.

>>> from agentloop import Agent, tool
>>> from agentloop.testing import ScriptedEngine, call
>>> @tool
... def add(a: int, b: int) -> int:
...     '''Add two integers.'''
...     return a + b
>>> engine = ScriptedEngine([call("add", a=2, b=3), "2 + 3 = 5"])
>>> result = Agent(engine, [add]).run_sync("What is 2 + 3?")
>>> result.output, [c.result.content for c in result.calls]
('2 + 3 = 5', ['5'])
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from contextlib import aclosing
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Literal, Sequence, Union

import anyio
import anyio.from_thread

from .engine.base import Engine
from .engine.generation import CallCost, Draft, GenerationOptions
from .engine.session import Session
from .errors import AgentloopError, MaxStepsExceeded, ModelOutputError, ParseError, ToolRetriesExhausted
from .grammar import CompiledGrammar, SchemaOptions, ToolCall, compile_tools
from .grammar.copy import uses_copy, without_copy
from .protocol import Protocol, Segment
from .tools import DepsT, RunContext, Tool, ToolResult, as_tool

# ---- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserMessage:
    text: str


@dataclass(frozen=True)
class ModelMessage:
    """What the model wrote in one step: calls, or a final text (never both)."""

    calls: tuple[ToolCall, ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class ToolResultsMessage:
    """The results of one step's calls, in call order."""

    results: tuple[ToolResult, ...]


Message = Union[UserMessage, ModelMessage, ToolResultsMessage]

# ---- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStepStart:
    step: int


@dataclass(frozen=True)
class CanvasDraft:
    """The argmax canvas after one denoising step (decoded), for live previews."""

    step: int
    draft: Draft
    text: str


@dataclass(frozen=True)
class ModelStepEnd:
    step: int
    message: ModelMessage
    cost: CallCost


@dataclass(frozen=True)
class ToolCallStart:
    step: int
    call: ToolCall


@dataclass(frozen=True)
class ToolCallEnd:
    step: int
    call: ToolCall
    result: ToolResult


@dataclass(frozen=True)
class FinalAnswer:
    text: str


@dataclass(frozen=True)
class RunComplete:
    result: "RunResult"


Event = Union[ModelStepStart, CanvasDraft, ModelStepEnd, ToolCallStart, ToolCallEnd, FinalAnswer, RunComplete]

# ---- results and trace ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    step: int
    call: ToolCall
    result: ToolResult


@dataclass(frozen=True)
class StepTrace:
    """One loop turn: the model call's cost record, the tools' time and the turn's wall time."""

    step: int
    cost: CallCost
    tool_s: float
    latency_s: float
    calls: tuple[str, ...]
    final: bool

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.cost.as_dict(), "tool_s": self.tool_s, "latency_s": self.latency_s,
                "calls": list(self.calls), "final": self.final}


@dataclass(frozen=True)
class Usage:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    denoising_steps: int = 0
    forced_tokens: int = 0
    tool_calls: int = 0


@dataclass
class RunResult:
    """What a run produced. ``messages`` continues the conversation:
    ``agent.run(next_prompt, message_history=result.messages)`` (the session cache is reused)."""

    output: str | None
    messages: list[Message]
    calls: list[CallRecord] = field(default_factory=list)
    trace: list[StepTrace] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def usage(self) -> Usage:
        t = self.trace
        return Usage(len(t), sum(s.cost.prefill_tokens for s in t), sum(s.cost.generated_tokens for s in t),
                     sum(s.cost.denoising_steps for s in t), sum(s.cost.forced_tokens for s in t), len(self.calls))

    def trace_dicts(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.trace]


Approver = Callable[[ToolCall, RunContext[Any]], Union[bool, Awaitable[bool]]]

# ---- the agent -----------------------------------------------------------------------------------


class Agent(Generic[DepsT]):
    """An engine, tools and instructions; ``run`` / ``run_sync`` / ``stream`` a prompt.

    ``parallel_tool_calls`` lets one model step call several tools (run concurrently).
    ``tool_choice``: ``"auto"`` (calls or a final answer, the model decides), ``"required"``
    (every step calls a tool; the run ends at ``max_steps``) or ``"none"`` (answer only).
    ``approve`` is asked before any tool marked ``requires_approval=True`` runs.
    ``keep_sessions``: how many finished runs keep their session (and its KV cache) so that
    ``message_history=result.messages`` continues without re-encoding; 0 keeps none (an agent
    serving independent one-shot requests), ``forget()`` drops them.
    ``declare_tools=False`` leaves the tool declarations out of the system turn (for a model
    trained on a fixed tool set, like the bundled demo model; the grammar still holds it to them).
    ``copy_constraint``: parameters marked ``Copied[...]`` (``"x-copy": true``) take only
    values written in this run's user messages and tool results; the grammar is recompiled
    for each model step that has new text (a few ms to ~100 ms, in a worker thread).
    ``grounded_numbers=True`` holds the final answer to the same rule for numbers: every
    number it writes is one written in this run's user messages or tool results (no
    "46883" for a tool's "46.83"; also no rounding and no arithmetic of its own, so turn it
    on where answers report what tools computed).
    ``constrained=False`` turns the grammar off: the model's text is parsed, as
    prompt-and-parse runtimes do, and a malformed call raises ``ModelOutputError`` (for
    comparisons; calls to unknown tools and invalid arguments go back to the model as errors).
    """

    def __init__(self, engine: Engine, tools: Sequence[Tool | Callable[..., Any]] = (), *, instructions: str = "",
                 max_steps: int = 10, parallel_tool_calls: bool = True, wire_format: str = "gemma4",
                 options: GenerationOptions | None = None, approve: Approver | None = None,
                 tool_choice: Literal["auto", "required", "none"] = "auto", declare_tools: bool = True,
                 keep_sessions: int = 16, copy_constraint: bool = True, grounded_numbers: bool = False,
                 constrained: bool = True) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if tool_choice not in ("auto", "required", "none"):
            raise ValueError(f"tool_choice must be 'auto', 'required' or 'none', got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise AgentloopError("tool_choice='required' needs at least one tool")
        self.tool_choice = tool_choice
        self.copy_constraint = copy_constraint
        self.grounded_numbers = grounded_numbers
        self.constrained = constrained
        self.declare_tools = declare_tools
        self.keep_sessions = keep_sessions
        self.engine = engine
        self.tools = [as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise AgentloopError(f"two tools are named {sorted(dup)[0]!r}; tool names must be unique")
        if approve is None and any(t.requires_approval for t in self.tools):
            needs = [t.name for t in self.tools if t.requires_approval]
            raise AgentloopError(f"tools {needs} require approval: pass Agent(..., approve=callback)")
        self._by_name = {t.name: t for t in self.tools}
        self.instructions = instructions
        self.max_steps = max_steps
        self.parallel_tool_calls = parallel_tool_calls
        self.protocol = Protocol(wire_format)
        self.options = options
        self.approve = approve
        self._constraint: CompiledGrammar | None = None
        self._copies = constrained and ((copy_constraint and any(uses_copy(t.parameters) for t in self.tools))
                                        or (grounded_numbers and tool_choice != "required"))
        self._copy_grammars: OrderedDict[tuple[str, ...], CompiledGrammar] = OrderedDict()
        self._copy_lock = threading.Lock()
        # Sessions of finished runs, keyed by their message list, so a continued conversation
        # encodes only its new tokens. Bounded; a session is taken out while a run uses it.
        self._sessions: OrderedDict[int, tuple[list[Message], tuple[Any, ...], Session]] = OrderedDict()

    @property
    def constraint(self) -> CompiledGrammar:
        """The grammar of one model step: one or more calls (one, without parallel calls), or a
        final text. With copied parameters, this is the grammar of an empty conversation
        (they can take no value); each run step uses ``constraint_for(messages)``."""
        if self._constraint is None:
            self._constraint = self._compile(())
        return self._constraint

    def constraint_for(self, messages: Sequence[Message]) -> CompiledGrammar:
        """The grammar of the model step that follows ``messages``: copied parameters may
        take values written in its user messages and tool results."""
        if not self._copies:
            return self.constraint
        sources = copy_sources(messages)
        with self._copy_lock:  # runs of one agent in several tasks call this from worker threads
            g = self._copy_grammars.get(sources)
            if g is not None:
                self._copy_grammars.move_to_end(sources)
                return g
        g = self._compile(sources)
        with self._copy_lock:
            self._copy_grammars[sources] = g
            while len(self._copy_grammars) > 8:
                self._copy_grammars.popitem(last=False)
        return g

    def _compile(self, sources: tuple[str, ...]) -> CompiledGrammar:
        tools = [] if self.tool_choice == "none" else [t.tool_schema for t in self.tools]
        if not self.copy_constraint:
            tools = [replace(t, parameters=without_copy(t.parameters)) for t in tools]
        return compile_tools(tools, self.engine.tokenizer, self.protocol.wire_format,
                             allow_text=self.tool_choice != "required", parallel_calls=self.parallel_tool_calls,
                             options=SchemaOptions(copy_sources=sources, grounded_text_numbers=self.grounded_numbers))

    # ---- public runs -----------------------------------------------------------------------------
    async def run(self, prompt: str, *, message_history: Sequence[Message] | None = None,
                  deps: DepsT = None) -> RunResult:  # type: ignore[assignment]
        """Run the loop until a final answer; raises ``MaxStepsExceeded`` or
        ``ToolRetriesExhausted`` (with ``.partial``) when it cannot finish."""
        result: RunResult | None = None
        async with aclosing(self._loop(prompt, message_history, deps, want_drafts=False)) as events:
            async for ev in events:
                if isinstance(ev, RunComplete):
                    result = ev.result
        assert result is not None
        return result

    def run_sync(self, prompt: str, *, message_history: Sequence[Message] | None = None,
                 deps: DepsT = None) -> RunResult:  # type: ignore[assignment]
        """``run`` for scripts: starts an event loop (asyncio) and blocks until the answer."""
        return anyio.run(lambda: self.run(prompt, message_history=message_history, deps=deps))

    async def stream(self, prompt: str, *, message_history: Sequence[Message] | None = None,
                     deps: DepsT = None) -> AsyncIterator[Event]:  # type: ignore[assignment]
        """Events as they happen: model step start/end, canvas drafts, tool calls and
        results, the final answer, and ``RunComplete(result)`` last. If you stop iterating
        early, close the stream (``async with contextlib.aclosing(agent.stream(...))``) so
        the model call stops at once."""
        async with aclosing(self._loop(prompt, message_history, deps, want_drafts=True)) as events:
            async for ev in events:
                yield ev

    # ---- the loop ----------------------------------------------------------------------------------
    async def _loop(self, prompt: str, history: Sequence[Message] | None, deps: Any,
                    want_drafts: bool) -> AsyncIterator[Event]:
        t_run = time.perf_counter()
        messages: list[Message] = list(history or [])
        session = self._take_session(history)
        if session is None:
            session = self.engine.session()
            session.append_segments(self._render_history(messages))
        if messages and isinstance(messages[-1], ModelMessage) and messages[-1].text is None:
            raise AgentloopError("message_history ends with tool calls that have no results")
        session.append_segments(self.protocol.user_segments(prompt) + [(self.protocol.model_start, False)])
        messages.append(UserMessage(prompt))
        result = RunResult(None, messages)
        failures: dict[str, int] = {}
        for step in range(1, self.max_steps + 1):
            t_step = time.perf_counter()
            yield ModelStepStart(step)
            gen = None
            constraint = None
            if self.constrained:
                constraint = self.constraint if not self._copies else \
                    await anyio.to_thread.run_sync(self.constraint_for, messages)
            # Inner generators are closed explicitly, in this task: their task group and the
            # engine call end here when the caller stops early, never in a finalizer elsewhere.
            async with aclosing(self._model_step(session, constraint, step, want_drafts)) as items:
                async for item in items:
                    if isinstance(item, CanvasDraft):
                        yield item
                    else:
                        gen = item
            assert gen is not None
            if constraint is not None:
                parsed = gen.parsed
            else:
                try:
                    parsed = self.protocol.parse_output(gen.text)
                except ParseError as e:
                    result.total_s = time.perf_counter() - t_run
                    raise ModelOutputError(f"model step {step}: {e}; output: {gen.text!r}", partial=result) from None
            if parsed.text is not None or not parsed.calls:
                msg = ModelMessage(text=parsed.text or "")
                messages.append(msg)
                session.append_text(self.protocol.model_end)
                yield ModelStepEnd(step, msg, gen.cost)
                result.output = msg.text
                result.trace.append(StepTrace(step, gen.cost, 0.0, time.perf_counter() - t_step, (), True))
                yield FinalAnswer(msg.text or "")
                result.total_s = time.perf_counter() - t_run
                self._keep_session(result.messages, session)
                yield RunComplete(result)
                return
            msg = ModelMessage(calls=tuple(parsed.calls))
            messages.append(msg)
            yield ModelStepEnd(step, msg, gen.cost)
            for c in msg.calls:
                yield ToolCallStart(step, c)
            t_tools = time.perf_counter()
            results = await self._run_calls(msg.calls, step, deps, failures)
            tool_s = time.perf_counter() - t_tools
            for c, r in zip(msg.calls, results):
                result.calls.append(CallRecord(step, c, r))
                yield ToolCallEnd(step, c, r)
            messages.append(ToolResultsMessage(tuple(results)))
            session.append_segments(self.protocol.after_calls_segments([(r.name, r.content) for r in results]))
            result.trace.append(StepTrace(step, gen.cost, tool_s, time.perf_counter() - t_step,
                                          tuple(c.name for c in msg.calls), False))
            over = [n for n, k in failures.items() if k > self._by_name[n].retries]
            if over:
                result.total_s = time.perf_counter() - t_run
                t = self._by_name[over[0]]
                raise ToolRetriesExhausted(
                    f"tool {t.name!r} failed {failures[t.name]} times (retries={t.retries}); last error: "
                    f"{next(r.content for r in reversed(results) if r.name == t.name)}", partial=result)
        result.total_s = time.perf_counter() - t_run
        raise MaxStepsExceeded(f"no final answer after max_steps={self.max_steps} model steps", partial=result)

    async def _model_step(self, session: Session, constraint: CompiledGrammar | None, step: int,
                          want_drafts: bool) -> AsyncIterator[Any]:
        """The engine call; with ``want_drafts`` its drafts are yielded while it runs."""
        if not want_drafts:
            yield await self.engine.generate(session, constraint, options=self.options)
            return
        # Unbounded: drafts are small and the engine thread must never block on a slow reader.
        send, receive = anyio.create_memory_object_stream[Any](max_buffer_size=math.inf)
        decode = self.engine.decode

        def on_draft(d: Draft) -> None:  # runs in the engine's worker thread (or inline for test engines)
            ev = CanvasDraft(step, d, decode(d.tokens))
            try:
                try:
                    anyio.from_thread.run_sync(send.send_nowait, ev)
                except RuntimeError:  # called on the event loop's own thread
                    send.send_nowait(ev)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer has gone; the call is being cancelled

        async def call() -> None:
            async with send:
                try:
                    out: Any = await self.engine.generate(session, constraint, options=self.options,
                                                          on_draft=on_draft)
                except Exception as e:  # hand it to the reader's task: raised here it would cancel the reader
                    out = _Failed(e)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(out)

        failed: BaseException | None = None
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(call)
            try:
                async for item in receive:
                    if isinstance(item, _Failed):
                        failed = item.error
                        break
                    yield item
            except GeneratorExit:
                # The consumer stopped early: cancel the engine call (it stops at its next
                # denoising step) and finish quietly; the task group waits for it here.
                tg.cancel_scope.cancel()
                return
        if failed is not None:
            raise failed  # outside the task group: the caller sees the engine's own error

    async def _run_calls(self, calls: Sequence[ToolCall], step: int, deps: Any,
                         failures: dict[str, int]) -> list[ToolResult]:
        results: list[ToolResult | None] = [None] * len(calls)

        async def one(i: int, c: ToolCall) -> None:
            t = self._by_name.get(c.name)
            if t is None:  # only an unconstrained model can name a tool that does not exist
                results[i] = ToolResult(c.name, f"there is no tool named {c.name!r}; the tools are: "
                                                f"{', '.join(self._by_name)}", True)
                return
            ctx = RunContext(deps, step=step, tool_name=t.name, retry=failures.get(t.name, 0))
            if t.requires_approval:
                assert self.approve is not None
                ok = self.approve(c, ctx)
                if inspect.isawaitable(ok):
                    ok = await ok
                if not ok:
                    results[i] = ToolResult(t.name, f"the user did not approve this call to {t.name}", True)
                    return
            r = await t.run(dict(c.arguments), ctx)
            if r.is_error:
                failures[t.name] = failures.get(t.name, 0) + 1
            results[i] = r

        async with anyio.create_task_group() as tg:
            for i, c in enumerate(calls):
                tg.start_soon(one, i, c)
        return [r for r in results if r is not None]

    # ---- conversation text -------------------------------------------------------------------------
    def _system(self) -> str:
        p = self.protocol
        decls = [p.render_declaration(t.name, t.description, t.parameters) for t in self.tools] \
            if self.declare_tools else []
        return p.system_turn(self.instructions, decls)

    def _render_history(self, messages: Sequence[Message]) -> list[Segment]:
        """The whole conversation as the model reads it (system turn first), in pieces."""
        p = self.protocol
        schemas = {t.name: t.parameters for t in self.tools}
        out: list[Segment] = [(self._system(), False)]
        in_model_turn = False
        for m in messages:
            if isinstance(m, UserMessage):
                if in_model_turn:
                    out.append((p.model_end, False))
                out += p.user_segments(m.text)
                in_model_turn = False
            elif isinstance(m, ModelMessage):
                if not in_model_turn:
                    out.append((p.model_start, False))
                    in_model_turn = True
                if m.calls:
                    out += p.calls_segments(list(m.calls), schemas)
                else:
                    out += p.text_segments(m.text or "") + [(p.model_end, False)]
                    in_model_turn = False
            else:
                out += p.after_calls_segments([(r.name, r.content) for r in m.results])
        if in_model_turn:
            out.append((p.model_end, False))
        return out

    def _keep_session(self, messages: list[Message], session: Session) -> None:
        self._sessions[id(messages)] = (messages, tuple(messages), session)
        while len(self._sessions) > self.keep_sessions:
            self._sessions.popitem(last=False)

    def forget(self) -> None:
        """Drop the sessions kept for continuing conversations (and their KV caches)."""
        self._sessions.clear()

    def _take_session(self, history: Sequence[Message] | None) -> Session | None:
        if history is None:
            return None
        hit = self._sessions.pop(id(history), None)
        if hit is None or hit[0] is not history or tuple(history) != hit[1]:
            return None  # not ours, or edited since: re-encode from the messages
        return hit[2]


@dataclass(frozen=True)
class _Failed:
    error: Exception


def copy_sources(messages: Sequence[Message]) -> tuple[str, ...]:
    """The texts copied parameters may take values from: user messages and tool results."""
    out: list[str] = []
    for m in messages:
        if isinstance(m, UserMessage):
            out.append(m.text)
        elif isinstance(m, ToolResultsMessage):
            out += [r.content for r in m.results]
    return tuple(out)
