"""Test helpers for agents built on agentloop: an engine that replays a script.

``ScriptedEngine`` stands in for a model in *your* tests: it writes the calls and answers
you give it, in the wire format, and checks each against the same grammar a real engine
denoises under (a scripted call the tools' schemas reject fails loudly, as it could never
come out of the real engine). It is not evidence that the model engine works; the engine
has its own tests.

>>> from agentloop.testing import ScriptedEngine, call
>>> engine = ScriptedEngine([call("get_weather", city="Paris"), "Sunny in Paris."])
>>> engine.remaining
2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from .engine.generation import CallCost, Draft, Generation, GenerationOptions
from .engine.session import Session
from .errors import ScriptError
from .grammar import CompiledGrammar, ToolCall, byte_tokenizer
from .grammar.vocabulary import backend_tokenizer, encode_segments, encode_text
from .protocol import Protocol, Segment

#: One scripted model step: a final text, one call, several calls (parallel), or a function
#: of the conversation so far (decoded text) returning one of those.
ScriptItem = Union[str, ToolCall, Sequence[ToolCall], Callable[[str], Any]]


def call(name: str, /, **arguments: Any) -> ToolCall:
    """A scripted tool call: ``call("get_weather", city="Paris")``."""
    return ToolCall(name, arguments)


@dataclass(frozen=True)
class ScriptedStep:
    """What the scripted engine was asked at one step (for assertions in tests)."""

    prompt_text: str  #: the decoded session when the step began
    output_text: str


class ScriptedEngine:
    """Replays ``script`` one item per model step, through the constraint's checks."""

    def __init__(self, script: Sequence[ScriptItem], *, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        self._backend = backend_tokenizer(self.tokenizer)
        self.vocab_size = int(self._backend.get_vocab_size(with_added_tokens=True))
        self._script = list(script)
        self._next = 0
        self.steps: list[ScriptedStep] = []

    @property
    def remaining(self) -> int:
        return len(self._script) - self._next

    def encode(self, text: str, *, literal: bool = False) -> list[int]:
        return encode_text(self.tokenizer, text, literal=literal)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def session(self, prompt: str | Sequence[int] = ()) -> Session:
        s = Session(self)  # type: ignore[arg-type]
        s.append_text(prompt) if isinstance(prompt, str) else s.append(list(prompt))
        return s

    async def generate(self, session: Session, constraint: CompiledGrammar | None = None, *,
                       options: GenerationOptions | None = None,
                       on_draft: Callable[[Draft], None] | None = None) -> Generation:
        return self.generate_sync(session, constraint, options=options, on_draft=on_draft)

    def generate_sync(self, session: Session, constraint: CompiledGrammar | None = None, *,
                      options: GenerationOptions | None = None,
                      on_draft: Callable[[Draft], None] | None = None) -> Generation:
        if self._next >= len(self._script):
            raise ScriptError(f"the script ran out: the agent asked for model step {self._next + 1} but the script "
                              f"has {len(self._script)}")
        index = self._next
        self._next += 1
        prompt_text = self.decode(session.tokens)
        item = self._script[index]
        if callable(item) and not isinstance(item, ToolCall):
            item = item(prompt_text)
        segments, stop = self._render(item, constraint, index)
        text = "".join(t for t, _ in segments)
        content = encode_segments(self.tokenizer, segments)
        stop_id = self.encode(stop)
        if len(stop_id) != 1:
            raise ScriptError(f"stop token {stop!r} is not a single token of this tokenizer")
        if constraint is not None and not constraint.accepts(content + stop_id):
            raise ScriptError(f"scripted output {index + 1} is not valid for the tools' grammar (a real engine "
                              f"could never write it): {text!r}")
        if on_draft is not None:
            on_draft(Draft(0, 1, content + stop_id))
        prefill = session.pending_length
        session._cached = len(session._tokens)  # nothing to encode: no model
        session._tokens.extend(content)
        self.steps.append(ScriptedStep(prompt_text, text))
        cost = CallCost(prefill_tokens=prefill, canvases=1, denoising_steps=0, forced_tokens=0,
                        generated_tokens=len(content) + 1, encoder_s=0.0, decoder_s=0.0, constraint_s=0.0,
                        sampler_s=0.0, total_s=0.0)
        parsed = constraint.parse(content + stop_id) if constraint is not None else None
        return Generation(tokens=content, text=text, stop_token=stop_id[0], cost=cost, parsed=parsed,
                          canvases=[content + stop_id])

    def _render(self, item: Any, constraint: CompiledGrammar | None, index: int) -> tuple[list[Segment], str]:
        protocol = Protocol(constraint.wire_format if constraint is not None else "gemma4")
        schemas = {t.name: t.parameters for t in (constraint.tools if constraint is not None else [])}
        if isinstance(item, str):
            return protocol.text_segments(item), protocol.text_stop
        calls = [item] if isinstance(item, ToolCall) else list(item)
        if not calls or not all(isinstance(c, ToolCall) for c in calls):
            raise ScriptError(f"script item {index + 1} is {item!r}: expected a str, a ToolCall or a list of them")
        try:
            return protocol.calls_segments(calls, schemas), protocol.calls_stop
        except ValueError as e:
            raise ScriptError(f"script item {index + 1}: {e}") from None
