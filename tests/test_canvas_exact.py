"""Exactness of the canvas DP against brute-force enumeration on tiny cases.

Vocab 8, canvas <= 6: every canvas is enumerated, the valid ones kept (via the symbol
DFA, independent of the token automaton), and the restricted product distribution
computed directly. Viterbi, marginals, entropies and sampling must match it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from agentloop.errors import GrammarInputError, NoValidCanvasError
from agentloop.grammar import compile_schema, compile_tools
from conftest import word_tokenizer

# "12" is one token and also "1" + "2": ambiguous tokenizations must be handled exactly.
TOKENS = ["[", "]", "1", "2", ",", "12"]
SCHEMA = {"type": "array", "items": {"enum": [1, 2, 12]}, "maxItems": 2}


@pytest.fixture(autouse=True, params=["host", "host-live", "device"])
def vocab_passes(request, monkeypatch):
    """Every test runs three times: the vocabulary passes compiled on the host with the
    dense canvas passes, the same with the live-list passes (large automata take those),
    and the vocabulary passes in torch as they run for logits on a GPU
    (``device_passes``), here on the CPU."""
    from agentloop.grammar.compiled import CompiledGrammar

    monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", request.param == "device")
    if request.param == "host-live":
        monkeypatch.setattr(CompiledGrammar, "_canvas_pass_kind", "live")
    return request.param


@pytest.fixture(scope="module")
def grammar():
    return compile_schema(SCHEMA, word_tokenizer(TOKENS))


def enumerate_valid(g, L: int, state: int | None = None, partial: bool = False) -> np.ndarray:
    V = g.vocab.size
    valid = []
    for canvas in itertools.product(range(V), repeat=L):
        if state is None and not partial:
            ok = g.dfa.accepts(g.vocab.symbols(list(canvas)))
        else:
            q = g.state_after(canvas, state)
            ok = q >= 0 and (partial or g.is_complete(q))
        if ok:
            valid.append(canvas)
    return np.array(valid, dtype=np.int64)


def scores(valid: np.ndarray, logits: torch.Tensor) -> np.ndarray:
    x = logits.double().numpy()
    return x[np.arange(valid.shape[1])[None, :], valid].sum(axis=1)


def enumerated_marginals(valid: np.ndarray, logits: torch.Tensor) -> np.ndarray:
    """(L, V) marginals of the product distribution restricted to ``valid`` canvases."""
    s = scores(valid, logits)
    p = np.exp(s - s.max())
    p /= p.sum()
    L = valid.shape[1]
    out = np.zeros((L, logits.shape[-1]))
    for l in range(L):
        np.add.at(out[l], valid[:, l], p)
    return out


@pytest.mark.parametrize("L", [5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_is_the_argmax_over_valid_canvases(grammar, L, seed):
    valid = enumerate_valid(grammar, L)
    assert len(valid) > 3
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(seed)) * 2
    best = valid[np.argmax(scores(valid, logits))].tolist()
    assert grammar.viterbi(logits) == best


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_marginals_and_entropy_equal_enumeration(grammar, seed, partial):
    L = 5
    valid = enumerate_valid(grammar, L, partial=partial)
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(seed)) * 2
    expected = enumerated_marginals(valid, logits)
    got, H = grammar.marginals(logits, partial=partial, return_entropy=True)
    np.testing.assert_allclose(got.exp().numpy(), expected, atol=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(expected > 0, expected * np.log(expected), 0.0).sum(axis=1)
    np.testing.assert_allclose(H.numpy(), h, atol=1e-5)


def test_sample_matches_the_enumerated_distribution(grammar):
    """20k exact samples (fixed seed); total variation to the exact law < 0.03.

    With ~40 valid canvases, the expected TV of 20k samples is ~0.01; 0.03 leaves a wide
    margin while a sampler that ignored the constraint or the logits fails by far.
    """
    L = 5
    valid = enumerate_valid(grammar, L)
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(7)) * 1.5
    s = scores(valid, logits)
    p = np.exp(s - s.max())
    p /= p.sum()
    n = 20_000
    batch = logits.expand(n, L, -1).contiguous()
    samples = grammar.sample(batch, generator=torch.Generator().manual_seed(11))
    index = {tuple(c): i for i, c in enumerate(valid.tolist())}
    counts = np.zeros(len(valid))
    for c in samples:
        counts[index[tuple(c)]] += 1  # KeyError would mean an invalid sample
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.03, tv


def test_state_carries_over_between_canvases(grammar):
    """A canvas continued from a carried-over state: same answers as enumeration."""
    first = [2, 4]  # "[1" -- incomplete
    state = grammar.state_after(first)
    assert state >= 0 and not grammar.is_complete(state)
    L = 5
    valid = enumerate_valid(grammar, L, state=state)
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(5))
    best = valid[np.argmax(scores(valid, logits))].tolist()
    assert grammar.viterbi(logits, state=state) == best
    assert grammar.accepts(first + best)
    assert grammar.parse(first + best)[0] in (1, 12)


def test_forced_tokens_follow_from_the_language(grammar):
    # After the stop token only padding is possible; a 2-position canvas from "[1,2]"
    # minus the last bracket forces "]" then the stop token.
    state = grammar.state_after([2, 4, 6, 5])
    assert grammar.forced_tokens(3, state=state) == [3, 1, 0]
    assert grammar.forced_tokens(5)[0] == 2  # the array must open with "["


def test_no_valid_canvas_is_a_clear_error(grammar):
    for op in (grammar.viterbi, grammar.sample, grammar.marginals, grammar.denoise_step):
        with pytest.raises(NoValidCanvasError, match="partial=True"):
            op(torch.zeros(2, grammar.vocab.size))  # "[]" + stop needs 3
    assert len(grammar.viterbi(torch.zeros(2, grammar.vocab.size), partial=True)) == 2
    with pytest.raises(GrammarInputError, match="columns"):
        grammar.sample(torch.zeros(4, 3))
    with pytest.raises(GrammarInputError, match="does not exist"):
        grammar.marginals(torch.zeros(4, grammar.vocab.size), state=10_000)


def test_model_vocab_wider_than_tokenizer_never_emits_padding_columns(grammar):
    logits = torch.zeros(6, grammar.vocab.size + 5)
    logits[:, grammar.vocab.size :] = 100.0
    ids = grammar.viterbi(logits)
    assert max(ids) < grammar.vocab.size
    m = grammar.marginals(logits)
    assert torch.isinf(m[:, grammar.vocab.size :]).all()


def test_batched_equals_single(grammar):
    logits = torch.randn(3, 6, grammar.vocab.size, generator=torch.Generator().manual_seed(2))
    assert grammar.viterbi(logits) == [grammar.viterbi(x) for x in logits]
    torch.testing.assert_close(grammar.marginals(logits), torch.stack([grammar.marginals(x) for x in logits]))


def test_gemma4_tools_tiny_exact():
    """Same checks with special-token symbols and the tools envelope."""
    tok = word_tokenizer(["call:f", "{", "}", "x:", "1"],
                         specials=["<pad>", "<eos>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                   "<turn|>", '<|"|>', "<|turn>", "<|tool>", "<tool|>", "<tool_response|>"])
    g = compile_tools([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}],
                      tok, "gemma4", allow_text=False)
    V = g.vocab.size
    L = 11
    # Depth-first over the symbol DFA (independent of the token automaton under test).
    valid: list[tuple[int, ...]] = []

    def dfs(prefix: tuple[int, ...], q: int) -> None:
        if len(prefix) == L:
            if g.dfa.accept[q]:
                valid.append(prefix)
            return
        for t in range(V):
            q2 = g.dfa.run(g.vocab.token_symbols[t], q) if g.vocab.token_symbols[t] else -1
            if q2 >= 0:
                dfs(prefix + (t,), q2)

    dfs((), g.dfa.start)
    assert len(valid) >= 5
    for seed in range(3):
        logits = torch.randn(L, V, generator=torch.Generator().manual_seed(seed))
        valid_np = np.array(valid)
        best = valid_np[np.argmax(scores(valid_np, logits))].tolist()
        assert g.viterbi(logits) == best
        assert [c.name for c in g.parse(best).calls] == ["f"]
        np.testing.assert_allclose(g.marginals(logits).exp().numpy(), enumerated_marginals(valid_np, logits),
                                   atol=1e-6)


def test_denoise_step_agrees_with_the_separate_calls(grammar):
    logits = torch.randn(2, 6, grammar.vocab.size, generator=torch.Generator().manual_seed(9))
    out = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(4))
    assert out.argmax == grammar.viterbi(logits)
    assert out.sample == grammar.sample(logits, generator=torch.Generator().manual_seed(4))
    m, H = grammar.marginals(logits, return_entropy=True)
    torch.testing.assert_close(out.log_marginals, m)
    torch.testing.assert_close(out.entropy, H)


def test_denoise_step_writes_the_marginals_into_out(grammar):
    """The engine hands rows of its self-conditioning buffer as ``out``: the marginals are
    written there (no other copy), equal to those of a call without it."""
    logits = torch.randn(6, grammar.vocab.size, generator=torch.Generator().manual_seed(2))
    buffer = torch.full((8, grammar.vocab.size), 7.0)  # rows 0-1 stand for a forced prefix
    step = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(1), out=buffer[2:])
    plain = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(1))
    assert step.log_marginals.data_ptr() == buffer[2:].data_ptr()
    torch.testing.assert_close(buffer[2:], plain.log_marginals)
    assert torch.all(buffer[:2] == 7.0)
    assert step.sample == plain.sample and step.argmax == plain.argmax


def test_marginals_write_into_out(grammar):
    """A loop can hand ``marginals`` the same buffer every step (no fresh (L, V) tensor to
    fault in): the same values as without, batched too, entropies alike."""
    logits = torch.randn(2, 6, grammar.vocab.size, generator=torch.Generator().manual_seed(3))
    buffer = torch.full((2, 6, grammar.vocab.size), 7.0)
    got, H = grammar.marginals(logits, return_entropy=True, out=buffer)
    want, H_want = grammar.marginals(logits, return_entropy=True)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, want)
    torch.testing.assert_close(H, H_want)
    row = grammar.marginals(logits[1], out=buffer[0])
    assert row.data_ptr() == buffer[0].data_ptr()
    torch.testing.assert_close(buffer[0], want[1])


@pytest.mark.parametrize("op", ["denoise_step", "marginals"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "strided", "grad"])
def test_an_out_that_cannot_take_the_marginals_is_refused(grammar, bad, op):
    logits = torch.randn(6, grammar.vocab.size, generator=torch.Generator().manual_seed(2))
    out = {"shape": torch.empty(5, grammar.vocab.size), "dtype": torch.empty(6, grammar.vocab.size, dtype=torch.float64),
           "strided": torch.empty(grammar.vocab.size, 6).T,
           "grad": torch.empty(6, grammar.vocab.size, requires_grad=True)}[bad]
    match = "out requires grad" if bad == "grad" else r"out must be a contiguous float32 tensor of shape \(6, "
    with pytest.raises(GrammarInputError, match=match):
        getattr(grammar, op)(logits, out=out)


@pytest.mark.parametrize("op", ["denoise_step", "marginals"])
def test_the_marginals_can_be_written_over_the_logits(grammar, op):
    """``out`` may be the logits' own memory, as torch's ``out=`` allows. With the stop
    token masked with float32's lowest at every position (a mask each canvas passes
    once), the rows that need the masks' stand-ins are read again after the write: they
    were read from the marginals already written there (off by up to 16 nats)."""
    logits = torch.randn(6, grammar.vocab.size, generator=torch.Generator().manual_seed(7))
    logits[:, grammar.vocab.stop_id] = -3.4e38
    want = grammar.marginals(logits)
    buffer = logits.clone()
    got = getattr(grammar, op)(buffer, out=buffer)
    got = got if op == "marginals" else got.log_marginals
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, want)
    np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def test_allowed_tokens_far_below_a_forbidden_one_do_not_underflow():
    tok = word_tokenizer(TOKENS + ["x"])  # "x" is never allowed
    g = compile_schema(SCHEMA, tok)
    L = 5
    logits = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(3)) - 1000.0
    logits[:, tok.token_to_id("x")] = 0.0
    valid = enumerate_valid(g, L)
    np.testing.assert_allclose(g.marginals(logits).exp().numpy(), enumerated_marginals(valid, logits), atol=1e-6)
    assert g.viterbi(logits) == valid[np.argmax(scores(valid, logits))].tolist()
    assert g.accepts(g.sample(logits))


def test_a_required_token_far_below_an_allowed_one_elsewhere(grammar):
    """Position 0 can only be "[", while "]" (allowed elsewhere in the grammar) leads it by
    400 nats, as low temperatures make of a model's logits: the "[" group then weighs
    ~1e-174 against the row's reference, and so does the position's posterior total;
    their product underflows float64 and must not be formed (it was: a division by zero
    inside the compiled forward pass)."""
    L = 5
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(5))
    logits[0, grammar.vocab.size - len(TOKENS) + TOKENS.index("]")] = 400.0  # ids: the specials, then TOKENS
    valid = enumerate_valid(grammar, L)
    np.testing.assert_allclose(grammar.marginals(logits).exp().numpy(), enumerated_marginals(valid, logits), atol=1e-6)
    out = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
    assert out.argmax == valid[np.argmax(scores(valid, logits))].tolist()
    assert grammar.accepts(out.sample) and torch.isfinite(out.entropy).all()


def test_nan_logits_never_allowed_are_ignored_and_allowed_ones_are_named():
    """A nan logit on a token the grammar never allows changes nothing (its marginal is
    -inf, as for any such token); one on a token it allows is an error naming the
    canvas and position, never nan marginals fed back to the model."""
    tok = word_tokenizer(TOKENS + ["x"])
    g = compile_schema(SCHEMA, tok)
    x_id = tok.token_to_id("x")
    logits = torch.randn(2, 5, g.vocab.size, generator=torch.Generator().manual_seed(6))
    masked = logits.clone()
    masked[1, 2, x_id] = -math.inf
    logits[1, 2, x_id] = math.nan
    got = g.denoise_step(logits, generator=torch.Generator().manual_seed(1))
    want = g.denoise_step(masked, generator=torch.Generator().manual_seed(1))
    assert not torch.isnan(got.log_marginals).any() and got.log_marginals[1, 2, x_id] == -math.inf
    torch.testing.assert_close(got.log_marginals, want.log_marginals)
    assert got.argmax == want.argmax and got.sample == want.sample
    logits[1, 3, tok.token_to_id("1")] = math.nan  # allowed
    for op in (g.sample, g.marginals, g.denoise_step):
        with pytest.raises(GrammarInputError, match="canvas 1 position 3"):
            op(logits)


def test_a_plus_infinity_logit_at_an_allowed_token_is_refused_by_every_op():
    """+inf (a float16 model's overflow) at a token the grammar allows would be the score
    of every canvas through it: Viterbi returned one of them, whatever the other rows'
    logits. Every op refuses it, naming the position; at a token never allowed it
    changes nothing, and a huge finite logit forces its token."""
    tok = word_tokenizer(TOKENS + ["x"])
    g = compile_schema(SCHEMA, tok)
    logits = torch.randn(5, g.vocab.size, generator=torch.Generator().manual_seed(8))
    best = g.viterbi(logits)
    never = logits.clone()
    never[2, tok.token_to_id("x")] = math.inf
    assert g.viterbi(never) == best
    forced = logits.clone()
    forced[3, best[3]] = 1e20
    assert g.viterbi(forced) == best
    forced[3, best[3]] = math.inf
    for op in (g.viterbi, g.sample, g.marginals, g.denoise_step):
        with pytest.raises(GrammarInputError, match="canvas 0 position 3"):
            op(forced)


@pytest.mark.parametrize("bad", ["scalar", "float", "sparse"])
def test_logits_that_are_no_canvas_are_refused_by_name(grammar, bad):
    logits = {"scalar": torch.tensor(1.0), "float": 1.0,
              "sparse": torch.randn(5, grammar.vocab.size).to_sparse()}[bad]
    match = "dense tensor, got layout torch.sparse_coo" if bad == "sparse" else r"got a scalar|got shape \(\)"
    for op in (grammar.viterbi, grammar.marginals):
        with pytest.raises(GrammarInputError, match=match):
            op(logits)


@pytest.mark.parametrize("ids", [None, 5, "[1]"])
def test_token_ids_that_are_no_sequence_are_refused_by_name(grammar, ids):
    for op in (grammar.parse, grammar.accepts, grammar.state_after):
        with pytest.raises(GrammarInputError, match="token ids must be a sequence of ints"):
            op(ids)


def test_minus_infinity_logits_give_finite_entropies_or_a_clear_error(grammar):
    """A masked allowed token (-inf) weighs nothing: entropies stay finite. A position
    whose allowed tokens are all -inf admits no canvas: a clear error, never nan."""
    logits = torch.randn(5, grammar.vocab.size, generator=torch.Generator().manual_seed(4))
    free_logits = logits.clone()
    free = grammar.denoise_step(logits)
    l = int(free.entropy.argmax())  # a position with a choice: masking its best token leaves others
    t = free.argmax[l]
    logits[l, t] = -math.inf
    out = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.entropy).all() and out.argmax[l] != t and out.sample[l] != t
    logits[1, :] = -math.inf
    for op in (grammar.viterbi, grammar.sample, grammar.marginals, grammar.denoise_step):
        with pytest.raises(NoValidCanvasError, match="^no canvas of 5 positions .* whose logit is -inf"):
            op(logits)
        with pytest.raises(NoValidCanvasError, match="^canvas 1 of the batch of 2: no canvas .* logit is -inf"):
            op(torch.stack([free_logits, logits]))  # (a batch names the canvas)


# ---- logits beyond float64's range ----------------------------------------------------------
# At a low temperature a row's logits span thousands of nats: the valid tokens of a position
# can all lie 745+ nats below its best allowed token, or a branch of the grammar can fall
# ~700 nats behind early on and win later. The fast passes' float64 weights cannot hold
# that; such canvases are redone in log space (log_canvas), and must stay exact.


@pytest.fixture
def log_space_calls(monkeypatch):
    """How many canvases went to log space (a list holding the count)."""
    from agentloop.grammar.compiled import CompiledGrammar

    calls = [0]
    redo = CompiledGrammar._log_space

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return redo(self, *args, **kwargs)

    monkeypatch.setattr(CompiledGrammar, "_log_space", counted)
    return calls


def enumerated_entropies(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


@pytest.mark.parametrize("scale", [1.0, 300.0, 3000.0])
def test_marginals_and_entropies_are_exact_at_any_logit_scale(grammar, log_space_calls, scale):
    """Random logits times 300 or 3000 (a temperature of ~0.003 on a model's logits): the
    float64 passes used to say "no valid canvas" here. Marginals and entropies match
    enumeration; at scale 1 nothing goes to log space."""
    L = 6
    valid = enumerate_valid(grammar, L)
    for seed in range(4):
        logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(seed)) * scale
        want = enumerated_marginals(valid, logits)
        got, H = grammar.marginals(logits, return_entropy=True)
        step = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
        for m, h in ((got, H), (step.log_marginals, step.entropy)):
            np.testing.assert_allclose(m.exp().double().numpy(), want, atol=5e-6)
            np.testing.assert_allclose(h.numpy(), enumerated_entropies(want), atol=1e-5)
        assert step.argmax == valid[np.argmax(scores(valid, logits))].tolist()
        assert tuple(step.sample) in {tuple(c) for c in valid.tolist()}
    assert (log_space_calls[0] == 0) == (scale == 1.0), log_space_calls


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e30, 1e20])
def test_marginals_of_a_row_of_equal_huge_logits_are_exact(grammar, fill):
    """A position whose logits are all one huge value (a row masked with float32's
    lowest): its tokens weigh alike. log F - rowmax lost log F there, and the row's
    log-marginals summed to its count of tokens; the Viterbi canvas, whose scores summed
    the row's constant in, ignored every other row."""
    L = 6
    valid = enumerate_valid(grammar, L)
    for seed in range(5, 10):
        logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(seed))
        plain = logits.index_fill(0, torch.tensor([2]), 0.0)  # (a row's constant: no matter)
        want, best = enumerated_marginals(valid, plain), valid[np.argmax(scores(valid, plain))].tolist()
        logits[2] = fill
        step = grammar.denoise_step(logits)
        for m in (grammar.marginals(logits), step.log_marginals):
            np.testing.assert_allclose(m.exp().double().numpy(), want, atol=5e-6)
        assert grammar.viterbi(logits) == best and step.argmax == best


@pytest.mark.parametrize("fill", [1e20, -1e20])
def test_a_row_masked_whole_beside_rows_in_log_space(fill):
    """A row of one huge value while the other rows' logits span hundreds of nats (the
    canvas goes to log space), at a position whose atom holds three tokens: the torch
    pass (device path) added the row's best before taking the row's reference away and
    lost the atom's log 3 beside 1e20 (each token got probability 1, the row's entropy
    0). Found by a helper's fuzzing."""
    g = compile_schema({"type": "integer", "minimum": 0, "maximum": 99}, word_tokenizer(["0", "1", "2", "9", "10"]))
    L = 4
    valid = enumerate_valid(g, L)
    logits = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(0)) * 300
    logits[0] = 0.0
    want = enumerated_marginals(valid, logits)
    logits[0] = fill
    got, H = g.marginals(logits, return_entropy=True)
    np.testing.assert_allclose(got.exp().double().numpy(), want, atol=5e-6)
    np.testing.assert_allclose(H.numpy(), enumerated_entropies(want), atol=1e-5)
    assert H[0] > 1.0  # (three digits alike there)


def sampled_distance(g, logits: torch.Tensor, valid: np.ndarray, p: np.ndarray, n: int) -> float:
    """Total variation between ``n`` samples (one batch, a fixed seed) and the law ``p``
    over the ``valid`` canvases."""
    samples = g.sample(logits.expand(n, *logits.shape).contiguous(), generator=torch.Generator().manual_seed(11))
    index = {tuple(c): i for i, c in enumerate(valid.tolist())}
    counts = np.zeros(len(valid))
    for c in samples:
        counts[index[tuple(c)]] += 1  # KeyError would mean an invalid sample
    return 0.5 * float(np.abs(counts / n - p).sum())


def masked_law(valid: np.ndarray, logits: torch.Tensor) -> np.ndarray:
    """The probability of each valid canvas where logits of magnitude 2**33 or more are
    masks (``agentloop.grammar.masks``): the canvases with the fewest negative and the
    most positive of them (counted alike whatever their values), weighed by their
    other logits."""
    x = logits.double().numpy()
    picked = x[np.arange(valid.shape[1])[None, :], valid]  # (n, L)
    is_mask = np.abs(picked) >= 2.0**33
    count = (np.sign(picked) * is_mask).sum(axis=1)  # positive ones less negative ones
    s = np.where(count == count.max(), np.where(is_mask, 0.0, picked).sum(axis=1), -np.inf)
    p = np.exp(s - s.max())
    return p / p.sum()


def law_marginals(valid: np.ndarray, p: np.ndarray, V: int) -> np.ndarray:
    out = np.zeros((valid.shape[1], V))
    for l in range(valid.shape[1]):
        np.add.at(out[l], valid[:, l], p)
    return out


MIN32 = float(torch.finfo(torch.float32).min)


def masked_logits(g, case: str, seed: int) -> torch.Tensor:
    """Random logits with huge finite masks (tokens "[", "]", "1", "2", ",", "12" are 2..7)."""
    L = 6
    x = torch.randn(L, g.vocab.size, generator=torch.Generator().manual_seed(seed))
    stop = g.vocab.stop_id
    if case.startswith("stop at "):  # every valid canvas passes the stop token once
        x[:, stop] = float(case[len("stop at "):])
    elif case == "forced where forbidden":  # "[" is valid first only: each row after lies 1e20 below
        x[1:, 2] = 1e20
    elif case == "both":
        x[1:, 2] = 1e20
        x[:, stop] = MIN32
    elif case == "fewest":  # canvases pass 1 to 3 masks: those with 1 only count
        x[:, stop] = -1e20
        x[:, 6] = MIN32  # ","
        x[:, 7] = -1e30  # "12"
    elif case == "forced where allowed":  # "1" second: only the canvases with it count
        x[1, 4] = 1e20
    elif case == "alike":  # two mask values, counted alike
        x[0::2, stop] = -1e20
        x[1::2, stop] = MIN32
    return x


# (-1e9 is no mask: the canvases pass it at face value, in log space; the device path's
# writes take each atom from its own best there, where float32's step is 64)
MASK_CASES = ["stop at -1e9", "stop at -1e10", "stop at -1e13", "stop at -1e20", f"stop at {MIN32}",
              "forced where forbidden", "both", "fewest", "forced where allowed", "alike"]


@pytest.mark.parametrize("case", MASK_CASES)
def test_huge_finite_masks_are_exact(grammar, case):
    """Tokens masked with huge finite logits that the valid canvases cannot all avoid: the
    stop token at -1e13 .. -3.4e38 at every position (each canvas passes it once, at
    another position), "[" forced with +1e20 where the grammar forbids it (each later
    row's valid tokens lie 1e20 below its best), canvases passing 1 to 3 masks. Float64
    kept none of the canvases' O(1) differences beside those (marginals off by up to 1,
    samples at a total variation of 0.8, a wrong Viterbi canvas); with each mask's
    stand-in (``masks``), marginals, entropies and the Viterbi canvas are exact against
    enumeration, in ``marginals`` and ``denoise_step`` alike."""
    L = 6
    valid = enumerate_valid(grammar, L)
    for seed in (6, 7):
        logits = masked_logits(grammar, case, seed)
        p = masked_law(valid, logits)
        want = law_marginals(valid, p, grammar.vocab.size)
        best = valid[np.argmax(p)].tolist()
        got, H = grammar.marginals(logits, return_entropy=True)
        step = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
        for m, h in ((got, H), (step.log_marginals, step.entropy)):
            np.testing.assert_allclose(m.exp().double().numpy(), want, atol=5e-6)
            np.testing.assert_allclose(h.numpy(), enumerated_entropies(want), atol=1e-5)
        assert grammar.viterbi(logits) == best and step.argmax == best
        assert p[[tuple(c) for c in valid.tolist()].index(tuple(step.sample))] > 0


@pytest.mark.parametrize("case", ["stop at -1e20", "forced where forbidden", "fewest"])
def test_samples_follow_the_masked_law(grammar, case):
    """2000 samples in one batch under huge finite masks: total variation from the
    enumerated law below 0.06 (~0.03 expected with 14 canvases)."""
    L = 6
    valid = enumerate_valid(grammar, L)
    logits = masked_logits(grammar, case, 6)
    p = masked_law(valid, logits)
    assert sampled_distance(grammar, logits, valid, p, 2000) < 0.06


@pytest.mark.parametrize("pos,neg", [(1e20, -1e20), (1e20, MIN32), (2.0**33, -1e30)])
def test_the_viterbi_canvas_counts_cancelling_masks_as_the_marginals_do(pos, neg):
    """'"ab"' spelt a, b passes a positive mask and then a negative one (no mask, net)
    and a bonus of 5 at its end; the other canvases pass no mask. The marginals count
    the pair as cancelling; at face value (+1e20 - 3.4e38) the Viterbi pass ranked the
    canvas last, and it stands masks in only where its canvas passes one. A row holding
    a positive mask now sends it to the stand-ins too. Found by a helper's fuzzing."""
    g = compile_schema({"enum": ["ab", "ba", "a"]}, word_tokenizer(['"', "a", "b", "ab"]))
    q, a, b, stop = 2, 3, 4, g.vocab.stop_id
    L = 5
    logits = torch.zeros(L, g.vocab.size)
    logits[2, b], logits[3, q], logits[4, stop] = pos, neg, 5.0
    valid = enumerate_valid(g, L)
    p = masked_law(valid, logits)
    best = valid[np.argmax(p)].tolist()
    assert best == [q, a, b, q, stop]
    step = g.denoise_step(logits, generator=torch.Generator().manual_seed(0))
    assert g.viterbi(logits) == best and step.argmax == best
    np.testing.assert_allclose(step.log_marginals.exp().double().numpy(), law_marginals(valid, p, g.vocab.size),
                               atol=5e-6)


def test_a_batch_mixes_masked_canvases_and_others(grammar):
    """Stand-ins are taken per canvas: beside a canvas that must pass a -3.4e38, one
    without masks and one whose masks it can avoid keep their own answers."""
    L = 6
    valid = enumerate_valid(grammar, L)
    xs = torch.stack([masked_logits(grammar, f"stop at {MIN32}", 6), masked_logits(grammar, "none", 7),
                      masked_logits(grammar, "fewest", 8)])
    logp = grammar.marginals(xs)
    step = grammar.denoise_step(xs, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        p = masked_law(valid, xs[b])
        want = law_marginals(valid, p, grammar.vocab.size)
        for m in (logp[b], step.log_marginals[b]):
            np.testing.assert_allclose(m.exp().double().numpy(), want, atol=5e-6)
        assert step.argmax[b] == grammar.viterbi(xs[b]) == valid[np.argmax(p)].tolist()


def test_sample_is_exact_where_the_valid_tokens_lie_far_below_the_rows_best(grammar, log_space_calls):
    """Tokens the grammar allows elsewhere but not here get 2000 nats over the rest: the
    distribution over valid canvases is unchanged (they never count), but every valid
    token's weight underflows against the row's best. 3000 samples, TV < 0.05 (~0.02
    expected with 14 canvases)."""
    L = 6
    valid = enumerate_valid(grammar, L)
    logits = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(3)) * 1.5
    p = np.exp(scores(valid, logits) - scores(valid, logits).max())
    p /= p.sum()
    far = logits.clone()
    far[0, 3] += 2000.0  # "]" first: never
    far[1:, 2] += 2000.0  # "[" after the first: never
    assert sampled_distance(grammar, far, valid, p, 3000) < 0.05
    assert log_space_calls[0] > 0
    np.testing.assert_allclose(grammar.marginals(far).exp().double().numpy(), enumerated_marginals(valid, logits),
                               atol=5e-6)


def test_a_branch_far_behind_early_that_wins_later():
    """"aaaa" against "bbbb": b trails by 1200 nats after two letters (beyond float64's
    range from a), then leads by 1300 over the last two. Every logit lies within 700
    of its row's best, so no weight underflows on its own: only the two passes'
    disagreement about the canvas's mass tells the forward one lost "bbbb"."""
    g = compile_schema({"enum": ["aaaa", "bbbb"]}, word_tokenizer(['"', "a", "b"]), wire_format="json")
    q, a, b = 2, 3, 4
    L = 7  # '"' x x x x '"' <eos>
    logits = torch.full((L, g.vocab.size), -600.0)
    logits[0, q] = logits[5, q] = logits[6, 1] = 0.0
    logits[1, a] = logits[2, a] = 0.0  # b: -600 at each
    logits[3, b] = logits[4, b] = 0.0
    logits[3, a], logits[4, a] = -600.0, -700.0
    logp = g.marginals(logits)
    assert abs(logp[1, a] + 100.0) < 1e-3 and abs(logp[1, b]) < 1e-6  # P(aaaa) = e^-100 / (1 + e^-100)
    step = g.denoise_step(logits, generator=torch.Generator().manual_seed(0))
    assert step.argmax == step.sample == [q, b, b, b, b, q, 1]


def test_weights_that_lose_digits_show_as_masses_that_disagree():
    """No weight underflows to 0 here, yet two lose most of their digits: at the second
    letter every valid token lies 700 nats below the row's best (~1e-304, still a normal
    float64), and the branch behind by 38 nats (b in the forward pass, a in the
    backward one) lands at ~1e-320, where float64 keeps ~14 bits. Each pass then weighs
    its canvases with an error of ~1e-4, and the two passes' masses of the canvas
    disagree: the canvas is redone in log space (without that check its marginals were
    3.5e-4 off)."""
    g = compile_schema({"enum": ["aaaa", "bbbb"]}, word_tokenizer(['"', "a", "b"]), wire_format="json")
    q, a, b = 2, 3, 4
    L = 7
    logits = torch.full((L, g.vocab.size), -50.0)
    logits[0, q] = logits[5, q] = logits[6, 1] = 0.0
    logits[1, q] = logits[2, q] = 0.0  # a quote: allowed in the grammar, never here
    logits[1, a], logits[1, b] = 0.0, -38.0
    logits[2, a] = logits[2, b] = -700.0
    logits[3, b] = logits[4, b] = 0.0
    logits[3, a] = logits[4, a] = -20.0  # "bbbb" ahead by 2 in all
    valid = enumerate_valid(g, L)
    want = enumerated_marginals(valid, logits)
    assert abs(want[1, b] - 1 / (1 + math.exp(-2))) < 1e-12
    np.testing.assert_allclose(g.marginals(logits).exp().double().numpy(), want, atol=5e-6)


def test_a_batch_mixes_canvases_in_range_and_in_log_space(grammar, log_space_calls):
    """One canvas of a batch in range, the other redone in log space: each gets the
    marginals, entropies and Viterbi canvas it gets alone, and a valid sample."""
    L = 6
    mild = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(1))
    wild = torch.randn(L, grammar.vocab.size, generator=torch.Generator().manual_seed(2)) * 3000
    step = grammar.denoise_step(torch.stack([mild, wild]), generator=torch.Generator().manual_seed(0))
    assert log_space_calls[0] == 1
    valid = {tuple(c) for c in enumerate_valid(grammar, L).tolist()}
    for b, logits in enumerate((mild, wild)):
        alone = grammar.denoise_step(logits, generator=torch.Generator().manual_seed(0))
        assert step.argmax[b] == alone.argmax and tuple(step.sample[b]) in valid
        torch.testing.assert_close(step.log_marginals[b], alone.log_marginals)
        torch.testing.assert_close(step.entropy[b], alone.entropy)


def test_a_position_whose_posterior_mass_went_subnormal_is_redone_in_log_space(monkeypatch):
    """Two realistic tools at a realistic vocabulary (BPE 4k, json), a call's arguments
    continued from a carried-over state, logits N(0, 30): at one position the forward
    and the backward messages each put their valid canvases ~e^-360 below their rows'
    best, so the position's posterior mass (their products, summed) went subnormal while
    the two passes' total masses still agreed. Its factors came out 1.1e-3 off (every
    marginal of the position scaled by 0.9989; at other seeds a likely token's
    log-marginal -inf), found by fuzzing. Such a position now sends the canvas to log
    space: the fast passes' marginals equal the log-space ones (checked against an
    independent forward-backward when found)."""
    import json as json_

    from agentloop.grammar import canvas as dp
    from bench.tokenizers_offline import LOADERS, SCHEMAS

    tok, aliases = LOADERS["bpe-4k"]()
    g = compile_tools(json_.loads(SCHEMAS.read_text())[:2], tok, "json", aliases=aliases)
    state = g.state_after(tok.encode('[{"name":"convert_units","arguments":{"value', add_special_tokens=False).ids)
    x = torch.randn(32, g.vocab.size, generator=torch.Generator().manual_seed(36)) * 30.0
    got = g.denoise_step(x, torch.Generator().manual_seed(0), state=state, prune=False)
    monkeypatch.setattr(dp, "MASS_TOLERANCE", -1.0)  # every canvas in log space
    want = g.denoise_step(x, torch.Generator().manual_seed(0), state=state, prune=False)
    # (the fast passes' float32 terms are good to ~|x - rowmax| x 6e-8 relative: ~5e-6
    # at this scale; the fault was 1.1e-3)
    likely = want.log_marginals > -35
    assert (got.log_marginals.double().exp().sum(1) - 1).abs().max() < 2e-5
    assert (got.log_marginals - want.log_marginals)[likely].abs().max() < 1e-4
    assert (got.entropy - want.entropy).abs().max() < 2e-5


def test_forced_tokens_of_open_canvases_sweep_forward_and_match_the_support():
    """With partial=True (a canvas that may end anywhere: the engine's canvases but the
    last) forced_tokens sweeps forward from the state and stops where a choice stays open
    for good (``canvas.choices_for_good``), instead of building the support (115 ms a
    canvas at 20 tools, BPE 4k). Against the support's answer, from many states and for
    several lengths; a token forced after a choice ('x' in "ab1x" / "cd2x") is found."""
    import json
    import string
    from pathlib import Path

    from agentloop.grammar import byte_tokenizer
    from agentloop.grammar import canvas as dp

    ctok = word_tokenizer(list(string.printable))
    tools = json.loads((Path(__file__).resolve().parents[1] / "agentloop/data/tool_schemas.json").read_text())
    btok = byte_tokenizer()
    coded = {"type": "object", "properties": {"a": {"enum": ["ab1x", "cd2x"]}, "b": {"type": "string"}},
             "required": ["a", "b"]}
    grammars = [compile_schema(coded, ctok, "json"),
                compile_schema({"type": "array", "items": {"enum": ["ab1x", "cd2x", "q"]}, "maxItems": 3}, ctok,
                               "json"),
                compile_tools(tools[:3], btok, "gemma4", allow_text=True),
                compile_tools(tools[:3], btok, "gemma4", allow_text=False)]
    x_id = ctok.token_to_id("x")
    assert grammars[0]._choices_for_good.any()  # (the sweep runs: it has a choice that stays open, the string)
    assert grammars[0].forced_tokens(20, partial=True)[8:11] == [-1, x_id, ctok.token_to_id('"')]
    checked = 0
    for g in grammars:
        ta = g.automaton
        x = torch.randn(4, 24, g.vocab.size, generator=torch.Generator().manual_seed(1)) * 3
        states = {g.start_state}
        for ids in g.sample(x, partial=True, generator=torch.Generator().manual_seed(2)):
            states.update(q for cut in (3, 7, 12, 20) if (q := g.state_after(ids[:cut])) >= 0)
        for s0 in sorted(states):
            for length in (1, 5, 17, 64):
                sup = g._support(length, s0, True)
                want = dp._forced(sup.live, g._layout.state, g._layout.rank, *g._out_edges, ta.group_atoms,
                                  ta.group_offsets, ta.atom_offsets, ta.atom_tokens, length).tolist()
                assert g.forced_tokens(length, s0, partial=True) == want, (s0, length)
                checked += 1
    assert checked >= 100
    # the set's own definition: two tokens or more, and a successor in the set
    g = grammars[3]
    ta = g.automaton
    choices = g._choices_for_good
    assert choices.any()
    for s in np.flatnonzero(choices):
        edges = range(ta.src_offsets[s], ta.src_offsets[s + 1])
        tokens = sum(int(ta.atom_offsets[k + 1] - ta.atom_offsets[k]) for e in edges
                     for k in ta.group_atoms[ta.group_offsets[ta.edge_group[e]]:ta.group_offsets[ta.edge_group[e] + 1]])
        assert tokens >= 2 and any(choices[ta.edge_dst[e]] for e in edges)
