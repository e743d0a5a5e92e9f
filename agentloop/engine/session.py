"""A conversation held by one engine: its token history and the KV cache of that history.

Each engine call encodes only the tokens added since the last call (the previous output and
whatever the caller appended: tool results, the next user turn), never the whole history.
The cache is transformers' ``DynamicCache``, which is exact past the sliding window.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import EngineInputError

if TYPE_CHECKING:
    from .diffusion import DiffusionEngine


class Session:
    """Token history + KV cache of one conversation. Create with ``engine.session(...)``.

    >>> from agentloop.engine import DiffusionEngine
    >>> engine = DiffusionEngine.random()
    >>> s = engine.session("<|turn>user\\nhi<turn|>\\n")
    >>> s.pending_length > 0, s.cached_length
    (True, 0)
    """

    def __init__(self, engine: "DiffusionEngine", tokens: Sequence[int] = ()) -> None:
        self.engine = engine
        self._tokens: list[int] = []
        self._cached = 0  # how many of _tokens the cache holds
        self._cache: Any = None
        self._lock = threading.Lock()  # held by the engine while a call uses this session
        self.append(tokens)

    @property
    def tokens(self) -> list[int]:
        """The whole history (a copy)."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def cached_length(self) -> int:
        """Tokens already encoded into the cache."""
        return self._cached

    @property
    def pending_length(self) -> int:
        """Tokens the next call will encode."""
        return len(self._tokens) - self._cached

    def append(self, ids: Sequence[int]) -> None:
        """Queue token ids; the next engine call encodes them."""
        vocab = self.engine.vocab_size
        new = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise EngineInputError(f"token {i} of the appended ids is {t!r}: not an id of this model's "
                                       f"vocabulary (0..{vocab - 1})")
            new.append(t)
        with self._unused():
            self._tokens.extend(new)

    def append_text(self, text: str, *, literal: bool = False) -> list[int]:
        """Tokenize ``text`` with the engine's tokenizer and queue it; returns the ids.

        Special tokens spelled in ``text`` become the control tokens (templates), unless
        ``literal`` (text from users and tools: it can never open or close a turn)."""
        ids = self.engine.encode(text, literal=literal)
        self.append(ids)
        return ids

    def append_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Queue (text, literal) pieces, each tokenized as ``append_text`` would; returns the ids."""
        ids = [i for text, literal in segments if text for i in self.engine.encode(text, literal=literal)]
        self.append(ids)
        return ids

    def truncate(self, length: int) -> None:
        """Drop the tokens after the first ``length`` that are not encoded yet (e.g. an output
        to be replaced). Encoded tokens cannot be dropped: a cache with sliding-window layers
        cannot be cropped; use ``reset_cache`` and re-encode instead."""
        with self._unused():
            if not self._cached <= length <= len(self._tokens):
                raise EngineInputError(f"can truncate to {self._cached}..{len(self._tokens)} tokens (the first "
                                       f"{self._cached} are encoded), not {length}")
            del self._tokens[length:]

    def reset_cache(self) -> None:
        """Drop the cache; the next call re-encodes the whole history."""
        with self._unused():
            self._cache = None
            self._cached = 0

    @contextmanager
    def _unused(self) -> Iterator[None]:
        # Never block the caller (an event loop) behind a running call: refuse instead.
        if not self._lock.acquire(blocking=False):
            raise EngineInputError("this session is in use by a running engine call; wait for it to finish")
        try:
            yield
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"Session(tokens={len(self._tokens)}, cached={self._cached})"
