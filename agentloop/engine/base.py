"""The interface an agent needs from a model engine (``DiffusionEngine`` and test engines implement it)."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..grammar import CompiledGrammar
from .generation import Draft, Generation, GenerationOptions
from .session import Session


@runtime_checkable
class Engine(Protocol):
    """A model that continues a :class:`Session` under an optional grammar constraint."""

    tokenizer: Any
    vocab_size: int

    def encode(self, text: str, *, literal: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def session(self, prompt: str | Sequence[int] = ()) -> Session: ...

    async def generate(self, session: Session, constraint: CompiledGrammar | None = None, *,
                       options: GenerationOptions | None = None,
                       on_draft: Callable[[Draft], None] | None = None) -> Generation: ...
