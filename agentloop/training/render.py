"""Conversations -> the exact text the agent loop feeds the model, one example per model step."""

from __future__ import annotations

from typing import Any, Mapping

from ..protocol import Protocol, Segment
from .data import INSTRUCTIONS, Conversation


def render_steps(p: Protocol, conv: Conversation, schemas: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> list[tuple[list[Segment], list[Segment], str]]:
    """Per model step: (context segments, output segments, stop token text), as ``Agent``
    renders them (system turn without declarations, user turn, model turn; user, tool and
    model text encoded literally)."""
    context: list[Segment] = [(p.system_turn(INSTRUCTIONS), False)] + p.user_segments(conv.user) + \
        [(p.model_start, False)]
    out = []
    for step in conv.steps:
        if step.answer is not None:
            out.append((list(context), p.text_segments(step.answer), p.text_stop))
            break
        segs = p.calls_segments(list(step.calls), schemas)
        out.append((list(context), segs, p.calls_stop))
        context += segs
        context += p.after_calls_segments([(c.name, r) for c, r in zip(step.calls, step.results)])
    return out


def render_conversation(p: Protocol, conv: Conversation) -> tuple[list[Segment], list[str]]:
    """The whole conversation's context (up to the last step) and every output text (for tokenizer training)."""
    steps = render_steps(p, conv)
    return steps[-1][0], ["".join(t for t, _ in o) + s for _, o, s in steps]
