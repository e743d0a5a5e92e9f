"""The compiled pieces under the canvas DP, each against its definition: the float32 exp
and order keys, the Viterbi-only scan, token sampling inside a large atom, and the
jagged-diagonal edge layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agentloop.grammar import canvas as dp
from agentloop.grammar import compile_tools
from agentloop.grammar.float32_math import exp_nonpositive, key_to_bits, order_key

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop/data/tool_schemas.json").read_text())


def test_exp_is_within_two_ulp_and_flushes_below_the_normal_range():
    d = np.concatenate([-np.random.default_rng(0).random(200_000) * 87.0, [0.0, -1e-30, -87.0]]).astype(np.float32)
    got = np.array([exp_nonpositive(v) for v in d[:2000]] + [exp_nonpositive(v) for v in d[-3:]], np.float64)
    want = np.exp(np.concatenate([d[:2000], d[-3:]]).astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2 * 2.0**-23
    assert exp_nonpositive(np.float32(0.0)) == 1.0
    assert exp_nonpositive(np.float32(-87.5)) == 0.0 and exp_nonpositive(np.float32(-np.inf)) == 0.0
    assert np.isnan(exp_nonpositive(np.float32(np.nan))) and np.isnan(exp_nonpositive(np.float32(np.inf)))


def test_order_keys_sort_like_the_floats_and_put_nan_above_all():
    x = np.array([-np.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf], np.float32)
    keys = [order_key(b) for b in x.view(np.int32)]
    assert all(a < b for a, b in zip(keys, keys[1:]))  # strictly: -0.0 just below 0.0
    assert [key_to_bits(k) for k in keys] == x.view(np.int32).tolist()
    assert all(order_key(b) > keys[-1] for b in np.array([np.nan, -np.nan], np.float32).view(np.int32))


def test_viterbi_scan_never_takes_a_nan_for_an_atom_best():
    atom_of = np.array([0, 0, 1, 1, -1], np.int32)
    x = np.array([[np.nan, 1.0, -np.nan, -np.inf, 9.0], [2.0, 2.0, 3.0, np.nan, np.nan]], np.float32)
    _, _, _, amax, aarg = dp.reduce_atoms(x, dp.sorted_atoms(atom_of, 2), False, False)
    assert amax.tolist() == [[1.0, -np.inf], [2.0, 3.0]]
    assert aarg.tolist() == [[1, -1], [0, 2]]  # ties: the lowest token; no usable logit: -1


def test_token_sampling_inside_a_large_atom_follows_the_logits():
    """One atom of 1500 tokens (6 blocks of the scan's sums): 200k draws at one position,
    total variation to exp(x) / sum < 0.03 (the expected TV of 200k draws over 1500
    outcomes with this spread is ~0.02; a sampler off by one block is off by > 0.1)."""
    V = 1500
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1.5, V).astype(np.float32)
    n = 200_000
    rows = np.repeat(x[None], n, axis=0)
    atoms = dp.sorted_atoms(np.zeros(V, np.int32), 1)
    block_sums = np.empty((1, atoms.blocks[-1]), np.float32)
    _, _, _, amax, aarg = dp.reduce_atoms(rows[:1], atoms, True, False, block_sums)
    rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
    tokens = dp._sample_tokens(rows, rep(amax), rep(aarg), rep(block_sums), np.zeros(n, np.int32), atoms.perm,
                               atoms.lo, atoms.hi, atoms.blocks, rng.random((n, 3)))
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    tv = 0.5 * np.abs(np.bincount(tokens, minlength=V) / n - p).sum()
    assert tv < 0.03, tv


def _pulled_edges(pl) -> list[tuple[int, int, int]]:
    """(row, other end, group) of every edge of a pull layout, in row numbers."""
    n_heavy = len(pl.heavy) - 1
    edges = [(i, int(pl.other[e]), int(pl.group[e]))
             for i in range(n_heavy) for e in range(pl.heavy[i], pl.heavy[i + 1])]
    for r in range(len(pl.rounds) - 1):
        for j, e in enumerate(range(pl.rounds[r], pl.rounds[r + 1])):
            edges.append((n_heavy + j, int(pl.other[e]), int(pl.group[e])))
    return edges


@pytest.mark.parametrize("n_tools", [1, 5])
def test_jagged_layout_holds_every_edge_once(btok, n_tools):
    g = compile_tools(TOOLS[:n_tools], btok, "json")
    ta = g.automaton
    lay = g._layout
    want = sorted(zip(ta.edge_src.tolist(), ta.edge_dst.tolist(), ta.edge_group.tolist()))
    in_state, out_state = lay.in_state, lay.out_state
    assert np.array_equal(lay.fwd.rank[in_state], np.arange(len(in_state)))
    assert np.array_equal(lay.bwd.rank[out_state], np.arange(len(out_state)))
    fwd = [(int(in_state[o]), int(in_state[r]), grp) for r, o, grp in _pulled_edges(lay.fwd)]
    bwd = [(int(out_state[r]), int(out_state[o]), grp) for r, o, grp in _pulled_edges(lay.bwd)]
    assert sorted(fwd) == want and sorted(bwd) == want
    assert np.array_equal(out_state[lay.beta_row], in_state)
    for pl in (lay.fwd, lay.bwd):  # at most 8 heavy rows; the rows of round r + 1 are a prefix of round r's
        assert len(pl.heavy) - 1 <= 8 and np.all(np.diff(np.diff(pl.rounds)) <= 0)


def test_an_infinite_logit_at_an_allowed_token_is_named_like_a_nan(btok):
    """+inf at an allowed token has no finite distribution to give: the host pass refuses
    it with the position, as it does nan."""
    import torch

    from agentloop.errors import GrammarInputError
    from agentloop.grammar import compile_schema

    g = compile_schema({"enum": [1, 2]}, btok)
    x = torch.randn(2, 4, g.vocab.size)
    x[1, 0, btok.token_to_id("1")] = float("inf")
    with pytest.raises(GrammarInputError, match="nan or \\+inf at a token the grammar allows .canvas 1 position 0"):
        g.marginals(x)
