"""The model side of agentloop: DiffusionGemma in process, constrained by a grammar per step.

>>> from agentloop.engine import DiffusionEngine, GenerationOptions
>>> engine = DiffusionEngine.random(canvas_length=32)
>>> session = engine.session("<|turn>user\\nHi<turn|>\\n<|turn>model\\n")
>>> out = engine.generate_sync(session, options=GenerationOptions(seed=1, max_new_tokens=32))
>>> len(session) == len(engine.encode("<|turn>user\\nHi<turn|>\\n<|turn>model\\n")) + len(out.tokens)
True
"""

from .diffusion import DEFAULT_STOP_TOKENS, DiffusionEngine
from .generation import CallCost, Draft, Generation, GenerationOptions
from .models import diffusion_gemma_config, load_model, random_model
from .session import Session

__all__ = [
    "DEFAULT_STOP_TOKENS",
    "CallCost",
    "DiffusionEngine",
    "Draft",
    "Generation",
    "GenerationOptions",
    "Session",
    "diffusion_gemma_config",
    "load_model",
    "random_model",
]
