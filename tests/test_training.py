"""The demo model's training pieces: deterministic data, the tokenizer, the objective, resuming."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from agentloop.grammar import SchemaOptions, compile_tools
from agentloop.grammar.vocabulary import encode_segments, encode_text
from agentloop.protocol import Protocol
from agentloop.tools import load_tools
from agentloop.training.data import _OPS, _PREFIXES, _SUFFIXES, _UNITS, KINDS, TEMPLATES, conversations, corpus_text
from agentloop.training.render import render_steps
from agentloop.training.tokenizer import SPECIALS, train_tokenizer
from agentloop.training.train import (TrainConfig, batches, examples, loss_fn, make_batch, model_config, prefetched,
                                      tensor_batches, train)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_text(600, 1), 512)


def test_data_is_deterministic_and_splits_phrasings() -> None:
    a = list(conversations(200, seed=3, split="train"))
    assert a == list(conversations(200, seed=3, split="train"))
    assert a != list(conversations(200, seed=4, split="train"))
    assert {c.kind for c in a} == set(KINDS)
    held = list(conversations(200, seed=3, split="heldout"))
    assert not {c.user for c in a} & {c.user for c in held}  # fresh entities

    units = "|".join(re.escape(u) for names in _UNITS.values() for u in names)
    ops = "|".join(re.escape(o) for names in _OPS.values() for o in names)
    number = r"\d+(\.\d+)?"
    slot = {"a": number, "b": number, "v": number, "x": number, "days": number, "op": f"({ops})",
            "u1": f"({units})", "u2": f"({units})"}

    def pool(split: str) -> list[re.Pattern[str]]:
        out = []
        for trained, held_out in TEMPLATES.values():
            assert not set(trained) & set(held_out)
            for t in (trained if split == "train" else held_out):
                # any casing, a greeting before and a thanks after: what ``_surface`` may add
                body = re.sub(r"\\\{(\w+)\\\}", lambda m: slot.get(m[1], ".+?"), re.escape(t.rstrip(".?!")))
                pre = "|".join(re.escape(p) for p in _PREFIXES)
                post = "|".join(re.escape(s) for s in _SUFFIXES)
                out.append(re.compile(rf"(?i)({pre})?{body}[.?!]?({post})?\Z"))
        return out

    train_t, held_t = pool("train"), pool("heldout")
    singles = [c for c in held if c.kind == "single"]
    assert all(any(p.match(c.user) for p in held_t) for c in singles)
    # most held-out requests are phrased in a way no training phrasing (however varied) produces
    unseen = [c for c in singles if not any(p.match(c.user) for p in train_t)]
    assert len(unseen) > 0.5 * len(singles)
    # trained phrasings are varied on the surface, held-out ones are not
    assert any(c.user[:1].islower() for c in a) and any(c.user.startswith(("Hey, ", "Please, ")) for c in a)


def test_tokenizer_specials_and_copyable_words(tok) -> None:
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    # a word is the same tokens in a request and inside a call's string
    word = tok.encode("Tavoren", add_special_tokens=False).ids
    req = tok.encode("weather in Tavoren?", add_special_tokens=False).ids
    call = tok.encode('city:<|"|>Tavoren<|"|>', add_special_tokens=False).ids
    assert any(req[i:i + len(word)] == word for i in range(len(req)))
    assert any(call[i:i + len(word)] == word for i in range(len(call)))


def test_every_target_is_a_valid_step_for_the_demo_tools(tok) -> None:
    """The scripted model outputs are sentences of the grammar the agent runs under."""
    tools = load_tools("tools/demo.py")
    schemas = {t.name: t.parameters for t in tools}
    p = Protocol("gemma4")
    for conv in conversations(60, seed=5, split="heldout"):
        sources = [conv.user]  # what the copy constraint allows at each step: the request, then results
        for step, (_, out, stop) in zip(conv.steps, render_steps(p, conv, schemas)):
            g = compile_tools([t.tool_schema for t in tools], tok, "gemma4",
                              options=SchemaOptions(copy_sources=tuple(sources)))
            ids = encode_segments(tok, out) + encode_text(tok, stop)
            assert g.accepts(ids), "".join(t for t, _ in out)
            sources += step.results


def test_batches_are_deterministic_and_grouped_by_length(tok) -> None:
    cfg = TrainConfig(batch_size=8, bucket_batches=4)
    a = [b for _, b in zip(range(6), batches(tok, cfg))]
    assert a == [b for _, b in zip(range(6), batches(tok, cfg))]
    padded = sum(max(len(c) for c, _ in b) * len(b) for b in a)
    ungrouped = [x for _, x in zip(range(48), examples(tok, cfg.seed))]
    plain = sum(max(len(c) for c, _ in ungrouped[i:i + 8]) * 8 for i in range(0, 48, 8))
    assert padded < plain  # the same examples, less padding


def test_a_few_steps_reduce_the_loss(tok) -> None:
    from transformers import DiffusionGemmaForBlockDiffusion

    cfg = TrainConfig(vocab_size=512, hidden_size=64, layers=2, heads=2, batch_size=8, lr=3e-3)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(model_config(cfg))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch([x for _, x in zip(range(8), examples(tok, 0))], cfg.canvas_length, 0)
    losses = []
    for _ in range(12):  # the same batch: the objective must be learnable
        loss, stats = loss_fn(model, batch, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_train_resumes_and_exports(tmp_path) -> None:
    cfg = TrainConfig(vocab_size=512, hidden_size=64, layers=2, heads=2, batch_size=4, checkpoint_minutes=10)
    folder = train(tmp_path, cfg, minutes=0.1, log=lambda m: None)
    first = json.loads((tmp_path / "train.json").read_text())["steps"]
    train(tmp_path, cfg, minutes=0.1, log=lambda m: None)
    assert json.loads((tmp_path / "train.json").read_text())["steps"] > first
    from agentloop.engine import DiffusionEngine

    e = DiffusionEngine.from_pretrained(folder)
    assert e.canvas_length == 64 and (folder / "agentloop.json").exists() and (tmp_path / "loss.png").exists()


def test_learning_rate_schedule_and_restart_cycle() -> None:
    """The first cycle is the shipped recipe's cosine whatever follows it; a restart cycle
    warms up from its floor to restart_lr and decays to a tenth of that."""
    import math

    plain = TrainConfig(max_steps=1000, warmup=100, restart_steps=0)
    again = TrainConfig(max_steps=1000, warmup=100, restart_steps=500, restarts=1, restart_lr=1e-3)
    assert [plain.lr_at(s) for s in range(1000)] == [again.lr_at(s) for s in range(1000)]
    assert plain.lr_at(99) == pytest.approx(plain.lr) and plain.lr_at(999) == pytest.approx(0.1 * plain.lr, rel=1e-4)
    floor = 0.1 * again.lr
    assert floor < again.lr_at(1000) < floor + (again.restart_lr - floor) / 50  # no jump at the restart
    assert again.lr_at(1099) == pytest.approx(again.restart_lr)
    assert again.lr_at(1499) == pytest.approx(0.1 * again.restart_lr, rel=1e-3)
    assert all(again.lr_at(s) >= again.lr_at(s + 1) for s in range(1099, 1499))
    assert again.total_steps == 1500 and plain.total_steps == 1000 and math.isfinite(again.lr_at(5000))
    twice = TrainConfig(max_steps=1000, warmup=100, restart_steps=500, restarts=2, restart_lr=1e-3)
    assert twice.total_steps == 2000
    assert [twice.lr_at(s) for s in range(1500)] == [again.lr_at(s) for s in range(1500)]
    assert [twice.lr_at(s) for s in range(1500, 2000)] == [again.lr_at(s) for s in range(1000, 1500)]


@pytest.mark.slow
def test_a_finished_run_continues_with_a_restart_cycle(tmp_path) -> None:
    """`agentloop train --restarts N` on a finished run's folder adds cycles (the steps
    taken keep their schedule); any other changed flag still resumes the run as it was."""
    tiny = dict(vocab_size=512, hidden_size=64, layers=2, heads=2, batch_size=4, warmup=2)
    train(tmp_path, TrainConfig(**tiny, max_steps=3, restart_steps=0), log=lambda m: None)
    logs: list[str] = []
    train(tmp_path, TrainConfig(**tiny, max_steps=3, restart_steps=2, restarts=1), log=logs.append)
    done = json.loads((tmp_path / "train.json").read_text())
    assert done["steps"] == 5 and done["config"]["restart_steps"] == 2
    assert any("restart cycles" in m for m in logs)
    train(tmp_path, TrainConfig(**tiny, max_steps=3, restart_steps=2, restarts=2), log=logs.append)
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 7
    # a different recipe flag does not take, nor a restart that would change the steps
    # already taken: the run keeps its own (and is finished)
    for other in ({**tiny, "batch_size": 8}, {**tiny, "restart_lr": 5e-4}):
        train(tmp_path, TrainConfig(**other, max_steps=3, restart_steps=2, restarts=2), log=logs.append)
        again = json.loads((tmp_path / "train.json").read_text())
        assert again["steps"] == 7 and again["config"]["batch_size"] == 4 and again["config"]["restart_lr"] == 1e-3


def test_prefetch_worker_draws_the_same_stream(tok) -> None:
    """A GPU run's worker process yields exactly the batches a CPU run draws (resumed too)."""
    import itertools

    cfg = TrainConfig(batch_size=4, bucket_batches=2)
    want = list(itertools.islice(tensor_batches(tok, cfg, skip=3), 4))
    stream = prefetched(tok, cfg, skip=3)
    got = list(itertools.islice(stream, 4))
    stream.close()
    assert all(torch.equal(w[k], g[k]) for w, g in zip(want, got) for k in w)


def test_space_prefix_tokenizer_shortens_text() -> None:
    texts = list(corpus_text(300, 1))
    split, prefix = train_tokenizer(texts, 512), train_tokenizer(texts, 512, space_prefix=True)
    sample = "In Oslo: light rain, 19 C. What is 12 mi in km?"
    assert "".join(prefix.decode(prefix.encode(sample).ids)) == sample
    assert len(prefix.encode(sample).ids) < len(split.encode(sample).ids)
    # before BPE, a space is a piece of its own only when spaces are split off ("Ġ" is a space)
    assert "Ġ" in [p for p, _ in split.pre_tokenizer.pre_tokenize_str(sample)]
    assert "Ġ" not in [p for p, _ in prefix.pre_tokenizer.pre_tokenize_str(sample)]


def test_cli_defaults_are_the_shipped_recipe() -> None:
    """`agentloop train` with no flags is the recipe of the bundled model."""
    from agentloop.cli import train_cmd

    flags = {p.name: p for p in train_cmd.params}
    cfg = TrainConfig()
    for name in ("seed", "batch_size", "hidden_size", "layers", "space_prefix", "restart_steps", "restarts",
                 "restart_lr"):
        assert flags[name].default == getattr(cfg, name), name
    assert f"[default: {cfg.max_steps}]" in flags["steps"].help
    card = json.loads((Path(__file__).parent.parent / "agentloop" / "model" / "agentloop.json").read_text())
    assert card["train_config"] == {**asdict(cfg), "checkpoint_minutes": card["train_config"]["checkpoint_minutes"]}


#: sha256 of the first 3,000 training conversations of the bundled model's run
SHIPPED_STREAM_DIGEST = "455f6446e1b5aa35a3e091098538666988c4f4521c09bd8df3e814bd1c5a50bd"


def _stream_digest(n: int) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in conversations(n, 0, "train"):
        steps = [[[[x.name, x.arguments] for x in s.calls], list(s.results), s.answer] for s in c.steps]
        h.update(json.dumps([c.kind, c.user, steps], sort_keys=True).encode())
    return h.hexdigest()


def test_training_stream_is_the_shipped_models() -> None:
    """The bundled model was trained on this stream (seed 0). Held-out phrasings and
    reporting may change freely; a change to what training draws needs a retrained model
    (and then a new digest here)."""
    assert _stream_digest(3000) == SHIPPED_STREAM_DIGEST
