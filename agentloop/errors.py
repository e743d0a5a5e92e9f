"""Every exception agentloop raises on purpose, in one place.

Each carries a message a user can act on: what is wrong, where (a JSON pointer, a token,
a file), and what to do instead.
"""

from __future__ import annotations


class AgentloopError(Exception):
    """Base class of all agentloop errors."""


class SchemaError(AgentloopError):
    """A JSON Schema the grammar compiler cannot represent exactly.

    ``keyword`` is the offending keyword and ``pointer`` its JSON pointer inside the schema
    (``""`` is the root), so a tool author sees exactly which part to change.
    """

    def __init__(self, message: str, *, keyword: str | None = None, pointer: str = "") -> None:
        self.keyword = keyword
        self.pointer = pointer
        self.message = message  # without the location, for re-raising with more context
        where = f" at '{pointer or '/'}'"
        super().__init__(f"{message}{where}")


class PatternError(SchemaError):
    """A ``pattern`` regex outside the supported subset (named with its position)."""


class AutomatonTooLarge(SchemaError):
    """A schema (most often a ``pattern``) whose automaton grows past the compiler's
    budget while being built: refused rather than filling the memory."""


class WireFormatError(AgentloopError):
    """A wire-format file in grammars/ is missing, malformed or names an unknown field."""


class VocabularyError(AgentloopError):
    """The tokenizer cannot spell what the grammar needs (a missing special token, ...)."""


class GrammarInputError(AgentloopError):
    """Bad input to a compiled grammar: wrong logits shape, a state that does not exist, ..."""


class NoValidCanvasError(GrammarInputError):
    """No canvas of the requested length is in the language from the given state."""


class ParseError(AgentloopError):
    """Token ids that are not a (complete) sentence of the grammar being parsed."""


class EngineError(AgentloopError):
    """Base class of the errors a model engine raises."""


class EngineInputError(EngineError):
    """Bad input to an engine call: an empty prompt, a token id the model does not have, bad options."""


class ContextLengthError(EngineError):
    """A session would grow past the model's context (``max_position_embeddings``).

    The engine never drops history silently: start a new session, or shorten the history
    (summarise older turns) and re-encode it.
    """


class GrammarMismatchError(EngineError):
    """A constraint compiled for another tokenizer than the engine's model uses."""


class ModelLoadError(EngineError):
    """A model path that does not hold a loadable DiffusionGemma checkpoint."""


class ToolDefinitionError(AgentloopError):
    """A Python function that cannot become a tool: a parameter without a type hint, a type
    the grammar cannot represent, a bad name. The message names the function and parameter."""


class ToolRetriesExhausted(AgentloopError):
    """A tool failed more times than its ``retries`` allow; ``.partial`` holds the run so far."""

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class MaxStepsExceeded(AgentloopError):
    """The agent used ``max_steps`` model calls without a final answer; ``.partial`` holds the run so far."""

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class ScriptError(AgentloopError):
    """A ``ScriptedEngine`` output that is not valid for the tools' grammar, or a script that ran out."""


class ModelOutputError(AgentloopError):
    """An unconstrained model (``Agent(constrained=False)``) wrote a call that does not
    parse; ``.partial`` holds the run so far. The constrained loop cannot raise it."""

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class KernelCompileError(AgentloopError):
    """Compiling agentloop's numba kernels ahead of time (``agentloop precompile``) failed
    in a process; the kernels it held compile at their first call instead."""
