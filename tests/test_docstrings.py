"""The runnable examples in the public modules' docstrings stay runnable."""

from __future__ import annotations

import doctest

import pytest

import agentloop.grammar
import agentloop.grammar.copy
import agentloop.grammar.wireformat


@pytest.mark.parametrize("module", [agentloop.grammar, agentloop.grammar.wireformat, agentloop.grammar.copy])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
