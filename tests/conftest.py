from __future__ import annotations

from typing import Sequence

import pytest
from tokenizers import AddedToken, Tokenizer, models

from agentloop.grammar import byte_tokenizer


def word_tokenizer(tokens: Sequence[str], specials: Sequence[str] = ("<pad>", "<eos>")) -> Tokenizer:
    """A tokenizer whose tokens spell exactly their text (ids: specials first, then tokens)."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


@pytest.fixture(scope="session")
def btok() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _isolated_grammar_cache(tmp_path_factory):
    """Tests never read or write the user's on-disk grammar cache."""
    import os

    old = os.environ.get("AGENTLOOP_CACHE_DIR")
    os.environ["AGENTLOOP_CACHE_DIR"] = str(tmp_path_factory.mktemp("grammar-cache"))
    yield
    if old is None:
        os.environ.pop("AGENTLOOP_CACHE_DIR", None)
    else:
        os.environ["AGENTLOOP_CACHE_DIR"] = old
