"""A small byte-level BPE for the demo model, with Gemma 4's protocol tokens as specials.

Two ways to cut text before BPE:

* ``space_prefix=False``: words are split from spaces, punctuation and single digits, so a
  word is tokenized the same in a request, in a call's string and in a tool result
  (copying a value is copying the same tokens), but every space is a token of its own;
* ``space_prefix=True``: a word, digit or punctuation mark carries the space before it
  (as GPT-2 and Gemma do). Contexts are about a fifth shorter and a parallel decoder no
  longer has to place spaces, but a value's first token differs between a sentence
  (" Oslo") and a call's string ("Oslo").
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
            "<|tool_response>", "<tool_response|>", '<|"|>']


#: Pre-token patterns (see the module docstring).
SPLIT_SPACES = r"\s+|[^\w\s]|\d"
SPACE_PREFIX = r" ?[^\W\d]+| ?\d| ?[^\w\s]|\s+"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, space_prefix: bool = False) -> Tokenizer:
    """Train on ``texts``; ids 0.. are ``SPECIALS`` in order (pad 0, eos 1, bos 2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPACE_PREFIX if space_prefix else SPLIT_SPACES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
