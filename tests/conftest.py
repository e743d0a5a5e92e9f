from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numba
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models

from agentloop.errors import NoValidCanvasError
from agentloop.grammar import byte_tokenizer

if "PYTEST_XDIST_WORKER" in os.environ:
    # `pytest -n N` runs N worker processes on the machine's cores. A worker whose torch and
    # numba thread pools also spanned every core would spin against the other workers (on 2
    # cores the suite ran slower on 2 workers than on one), so each keeps to one thread, and
    # the processes its tests start keep torch to one. Tests of threading set their own
    # counts. (NUMBA_NUM_THREADS stays: numba re-reads it at each compile, and refuses a
    # change once its pool runs.)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    numba.set_num_threads(1)


def word_tokenizer(tokens: Sequence[str], specials: Sequence[str] = ("<pad>", "<eos>")) -> Tokenizer:
    """A tokenizer whose tokens spell exactly their text (ids: specials first, then tokens)."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def calls_under_random_logits(g: Any, generator: torch.Generator, scales: Sequence[float], length: int,
                              batch: int = 3) -> Iterator[Any]:
    """Every call in the Viterbi and sampled canvases of ``g`` (a tools grammar) under
    random logits at each scale (high scales: whatever the model prefers, odd strings and
    huge numbers), skipping a batch without a valid canvas."""
    for scale in scales:
        logits = torch.randn(batch, length, g.vocab.size, generator=generator) * scale
        try:
            canvases = g.viterbi(logits) + g.sample(logits, generator=generator)
        except NoValidCanvasError:
            continue
        for ids in canvases:
            yield from g.parse(ids).calls


@pytest.fixture(scope="session")
def btok() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _isolated_grammar_cache(tmp_path_factory):
    """Tests never read or write the user's on-disk grammar cache."""
    old = os.environ.get("AGENTLOOP_CACHE_DIR")
    os.environ["AGENTLOOP_CACHE_DIR"] = str(tmp_path_factory.mktemp("grammar-cache"))
    yield
    if old is None:
        os.environ.pop("AGENTLOOP_CACHE_DIR", None)
    else:
        os.environ["AGENTLOOP_CACHE_DIR"] = old
