"""What a caller asks of one engine call (``GenerationOptions``) and what it gets back
(``Generation``, with its ``CallCost``); ``Draft`` is the canvas after each denoising step."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

from ..errors import EngineInputError


@dataclass(frozen=True)
class GenerationOptions:
    """Sampler settings of one call. The defaults are DiffusionGemma's own (``generate()``).

    >>> GenerationOptions(max_denoising_steps=16, seed=0).temperature_range
    (0.4, 0.8)
    >>> GenerationOptions(entropy_bound=-1.0)
    Traceback (most recent call last):
    ...
    agentloop.errors.EngineInputError: entropy_bound must be > 0, got -1.0
    """

    #: canvas budget, as in ``generate()``: a call denoises at most ceil(max_new_tokens /
    #: canvas_length) canvases and returns whole canvases up to the stop token, so an
    #: output may be longer than max_new_tokens by less than one canvas
    max_new_tokens: int = 1024
    #: most denoising steps per canvas
    max_denoising_steps: int = 48
    #: accept the lowest-entropy positions while sum(H) - max(H) stays below this (nats)
    entropy_bound: float = 0.1
    #: temperature at the first step (t_max) and at the last (t_min), linear in between
    t_max: float = 0.8
    t_min: float = 0.4
    #: stop once the argmax canvas repeats this many steps ...
    stability_threshold: int = 1
    #: ... and the mean per-position entropy is below this
    confidence_threshold: float = 0.005
    #: run every canvas for exactly max_denoising_steps (benchmarks); off: adaptive stopping
    fixed_steps: bool = False
    #: seed of the call's random numbers; None draws a fresh one
    seed: int | None = None
    #: "fast": one pass over the vocabulary per step. "reference": the library's random
    #: number order (reproduces ``generate()``; unconstrained only; slow at large vocabularies)
    sampler: Literal["fast", "reference"] = "fast"
    #: token ids that end an unconstrained call; None: the engine's (<eos>, <|tool_response>,
    #: <turn|>). With a constraint the grammar's own stop token ends the call.
    stop_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, value: Any) -> None:
            if not ok:
                raise EngineInputError(f"{what}, got {value!r}")

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1",
             self.max_new_tokens)
        need(isinstance(self.max_denoising_steps, int) and self.max_denoising_steps >= 1,
             "max_denoising_steps must be >= 1", self.max_denoising_steps)
        need(self.entropy_bound > 0, "entropy_bound must be > 0", self.entropy_bound)
        need(0 < self.t_min and 0 < self.t_max, "temperatures must be > 0", (self.t_min, self.t_max))
        need(self.stability_threshold >= 0, "stability_threshold must be >= 0", self.stability_threshold)
        need(self.confidence_threshold >= 0, "confidence_threshold must be >= 0", self.confidence_threshold)
        need(self.sampler in ("fast", "reference"), "sampler must be 'fast' or 'reference'", self.sampler)

    @property
    def temperature_range(self) -> tuple[float, float]:
        return (self.t_min, self.t_max)

    def replace(self, **changes: Any) -> "GenerationOptions":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class CallCost:
    """What one engine call cost. Times are wall-clock seconds on the calling thread
    (synchronised with the device), so they add up to ``total_s`` minus ``overhead_s``."""

    prefill_tokens: int  #: tokens the encoder added to the session cache (new turn tokens and continued canvases)
    canvases: int  #: canvases denoised
    denoising_steps: int  #: decoder forwards, all canvases together
    forced_tokens: int  #: output tokens the grammar fixed before any denoising
    generated_tokens: int  #: output tokens, stop token included
    encoder_s: float
    decoder_s: float
    constraint_s: float
    sampler_s: float
    total_s: float

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.encoder_s - self.decoder_s - self.constraint_s - self.sampler_s)

    @property
    def tokens_per_forward(self) -> float:
        """Output tokens per decoder forward (DiffusionGemma's headline efficiency figure)."""
        return self.generated_tokens / self.denoising_steps if self.denoising_steps else float(self.generated_tokens)

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["overhead_s"] = self.overhead_s
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


@dataclass(frozen=True)
class Draft:
    """The argmax canvas after one denoising step (for live previews)."""

    canvas_index: int
    step: int  #: 1-based step within the canvas
    tokens: list[int]


@dataclass(frozen=True)
class Generation:
    """The result of one engine call.

    ``tokens`` is what the model wrote, without the stop token; the session already holds
    them. ``stop_token`` is the id that ended the call (``None`` when ``max_new_tokens`` ran
    out first). The stop token itself is *not* added to the session: in the wire formats
    the next segment (a tool response, the end of the model turn) starts with it.
    """

    tokens: list[int]
    #: the tokens decoded, for reading: under a constraint take the calls from ``parsed`` (a
    #: gemma4 string may hold a delimiter's text, which a text parser would read as one)
    text: str
    stop_token: int | None
    cost: CallCost
    #: the constraint's parse (calls or text for tools, the value for a value schema); None unconstrained
    parsed: Any = None
    canvases: list[list[int]] = field(default_factory=list)  #: each final canvas, padding included

    @property
    def finished(self) -> bool:
        return self.stop_token is not None
