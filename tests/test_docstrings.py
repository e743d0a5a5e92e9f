"""The runnable examples in the public modules' docstrings stay runnable."""

from __future__ import annotations

import doctest

import pytest

import agentloop.engine
import agentloop.engine.diffusion
import agentloop.engine.generation
import agentloop.engine.models
import agentloop.engine.session
import agentloop.grammar
import agentloop.grammar.compiled
import agentloop.grammar.copy
import agentloop.grammar.wireformat

MODULES = [agentloop.grammar, agentloop.grammar.wireformat, agentloop.grammar.copy, agentloop.grammar.compiled,
           agentloop.engine, agentloop.engine.diffusion, agentloop.engine.generation, agentloop.engine.models,
           agentloop.engine.session]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
