"""The bundled demo model: a few-million-parameter DiffusionGemma trained on the demo tools.

It ships inside the package (``agentloop/model``: safetensors, config, tokenizer.json and
``agentloop.json``, which says how the model was trained to be prompted), loads offline
on a CPU in about a second, and is reproduced by ``agentloop train`` with its defaults.
It knows exactly the tools in :mod:`agentloop.demo_tools`; it is a demonstration of the
loop, not a general assistant.

>>> from agentloop.builtin import demo_agent
>>> agent = demo_agent()                                            # doctest: +SKIP
>>> result = agent.run_sync("What's the weather in Oslo?")          # doctest: +SKIP
>>> [c.call for c in result.calls]                                  # doctest: +SKIP
[ToolCall(name='get_weather', arguments={'city': 'Oslo'})]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.models import BUILTIN_MODEL_DIR
from .errors import EngineInputError, ModelLoadError

if TYPE_CHECKING:
    from .agent import Agent
    from .engine import DiffusionEngine, GenerationOptions

__all__ = ["BUILTIN_MODEL_DIR", "card_options", "demo_agent", "demo_engine", "model_card"]


def model_card(path: str | Path = BUILTIN_MODEL_DIR) -> dict[str, Any]:
    """The folder's ``agentloop.json`` (how the model expects to be run), or ``{}``."""
    f = Path(path) / "agentloop.json"
    return json.loads(f.read_text("utf-8")) if f.is_file() else {}


def card_options(path: str | Path = BUILTIN_MODEL_DIR, **overrides: Any) -> "GenerationOptions":
    """The sampler settings the model card recommends (``"options"``), with ``overrides``."""
    from .engine import GenerationOptions

    settings = {**model_card(path).get("options", {}), **overrides}
    known = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise EngineInputError(f"unknown sampler setting(s) {unknown}; GenerationOptions has: {', '.join(sorted(known))}")
    return GenerationOptions(**settings)


def demo_engine(path: str | Path = BUILTIN_MODEL_DIR, **kwargs: Any) -> "DiffusionEngine":
    """The bundled model (or a model folder ``agentloop train`` wrote) as a :class:`DiffusionEngine`."""
    from .engine import DiffusionEngine

    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"no model in {path}: this installation lacks the bundled demo model; "
                             "train one with `agentloop train` or pass a checkpoint folder")
    return DiffusionEngine.from_pretrained(path, **kwargs)


def demo_agent(path: str | Path = BUILTIN_MODEL_DIR, *, engine: Any = None, tools: Any = None,
               **agent_kwargs: Any) -> "Agent[Any]":
    """An :class:`Agent` set up as the model was trained: the demo tools, its instructions,
    tool declarations left out of the prompt (it learned the tools; the grammar holds it to
    their schemas), numbers in answers held to the conversation's (``grounded_numbers``).
    ``agent_kwargs`` go to ``Agent`` (``max_steps``, ``options``, ...)."""
    from .agent import Agent
    from .demo_tools import TOOLS

    card = model_card(path)
    engine = engine if engine is not None else demo_engine(path)
    kwargs: dict[str, Any] = dict(instructions=card.get("instructions", ""),
                                  declare_tools=card.get("declare_tools", True),
                                  wire_format=card.get("wire_format", "gemma4"),
                                  # every answer it learned reports numbers the tools or the user wrote
                                  grounded_numbers=True)
    kwargs.update(agent_kwargs)
    # Its outputs were all shorter than a canvas: a few canvases bound a run-on answer.
    options = kwargs.get("options") or card_options(path)
    kwargs["options"] = dataclasses.replace(options, max_new_tokens=min(options.max_new_tokens, card.get("max_new_tokens", 256)))
    return Agent(engine, TOOLS if tools is None else tools, **kwargs)
