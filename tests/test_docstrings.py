"""The runnable examples in the public modules' docstrings stay runnable."""

from __future__ import annotations

import doctest

import pytest

import agentloop
import agentloop.agent
import agentloop.argument_schema
import agentloop.engine
import agentloop.engine.diffusion
import agentloop.engine.generation
import agentloop.engine.models
import agentloop.engine.sampling
import agentloop.engine.session
import agentloop.grammar
import agentloop.grammar.compiled
import agentloop.grammar.copy
import agentloop.grammar.float32_math
import agentloop.grammar.float64_math
import agentloop.grammar.log_canvas
import agentloop.grammar.masks
import agentloop.grammar.schema
import agentloop.grammar.vocabulary
import agentloop.grammar.wireformat
import agentloop.precompile
import agentloop.protocol
import agentloop.testing
import agentloop.tools

MODULES = [agentloop.grammar, agentloop.grammar.wireformat, agentloop.grammar.copy, agentloop.grammar.compiled,
           agentloop.grammar.log_canvas, agentloop.grammar.masks, agentloop.grammar.schema,
           agentloop.grammar.float64_math, agentloop.grammar.float32_math, agentloop.engine, agentloop.engine.diffusion,
           agentloop.engine.generation, agentloop.engine.models, agentloop.engine.sampling, agentloop.engine.session,
           agentloop.grammar.vocabulary, agentloop, agentloop.agent, agentloop.protocol, agentloop.argument_schema,
           agentloop.testing, agentloop.tools, agentloop.precompile]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
