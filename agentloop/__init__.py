"""agentloop: fast local tool-use loops on a block-diffusion LM, every call valid by construction.

>>> from agentloop import Agent, tool
>>> from agentloop.testing import ScriptedEngine, call
>>> @tool
... def get_time(city: str) -> str:
...     '''Local time in a city.'''
...     return "14:05"
>>> Agent(ScriptedEngine([call("get_time", city="Oslo"), "It is 14:05."]), [get_time]).run_sync("Time in Oslo?").output
'It is 14:05.'
"""

from .agent import (
    Agent,
    CanvasDraft,
    Event,
    FinalAnswer,
    Message,
    ModelMessage,
    ModelStepEnd,
    ModelStepStart,
    RunComplete,
    RunResult,
    StepTrace,
    ToolCallEnd,
    ToolCallStart,
    ToolResultsMessage,
    Usage,
    UserMessage,
)
from .errors import AgentloopError, MaxStepsExceeded, ModelOutputError, ToolDefinitionError, ToolRetriesExhausted
from .grammar import ToolCall
from .tools import Copied, CopiedNumbers, RunContext, Tool, ToolResult, load_tools, tool

__all__ = [
    "Agent", "AgentloopError", "CanvasDraft", "Copied", "CopiedNumbers", "Event", "FinalAnswer", "MaxStepsExceeded", "Message",
    "ModelMessage", "ModelOutputError",
    "ModelStepEnd", "ModelStepStart", "RunComplete", "RunContext", "RunResult", "StepTrace", "Tool", "ToolCall",
    "ToolCallEnd", "ToolCallStart", "ToolDefinitionError", "ToolResult", "ToolResultsMessage",
    "ToolRetriesExhausted", "Usage", "UserMessage", "load_tools", "tool",
]
