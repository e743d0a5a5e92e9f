"""The constraint benchmark runs end to end at a tiny size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_constraint_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/constraint.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "constraint.json").read_text())
    assert data and (tmp_path / "constraint.md").read_text().startswith("# Constraint benchmark")


def test_engine_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/engine.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "engine.json").read_text())
    modes = {(c["config"], c["mode"]) for c in data["calls"]}
    assert modes == {("tiny", "unconstrained"), ("tiny", "constrained")}
    assert all(c["valid_calls"] == c["calls"] for c in data["calls"] if c["mode"] == "constrained")
    assert data["session"]["prefill_tokens"]["cached"] < data["session"]["prefill_tokens"]["re-encoded"]
    assert data["sampler"]["speedup"] > 0


def test_host_share_bench_measures_both_paths(tmp_path):
    """Both replayed steps run (each checked against the whole step's Viterbi canvas, and
    the device path, through the Triton paths' host lines with their kernels stood in
    for, against its sample too, by the bench itself) and the table holds a figure for
    each path."""
    out = tmp_path / "host_share.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/host_share.py"), "--tokenizers", "bpe-4k", "--tools", "1",
                        "--repeats", "2", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| bpe-4k | 1 |"))
    host, device = (float(cell.split()[0]) for cell in row.split("|")[6:8])
    assert host > 0 and device > 0


@pytest.mark.slow  # compiles both versions' kernels in its process (~1-2 min)
def test_host_share_ab_measures_both_versions(tmp_path):
    out = tmp_path / "host_share_ab.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/host_share.py"), "--baseline", "HEAD", "--tokenizers",
                        "bpe-4k", "--tools", "1", "--repeats", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| bpe-4k | 1 |"))
    ratios = [float(cell.strip().rstrip("x")) for cell in row.split("|")[5:8:2]]
    assert len(ratios) == 2 and all(x > 0 for x in ratios)


def test_log_space_bench_counts_the_canvases_redone_there(tmp_path):
    out = tmp_path / "log_space.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/log_space.py"), "--tools", "1", "--length", "32",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = out.read_text().splitlines()[-1].split(" | ")
    # N(0, 3) in range; N(0, 100) pruned on the fast passes (its underflowed atoms weigh
    # nothing); N(0, 300) in log space, over the cells a log-space sweep keeps
    assert row[4] == "0%" and row[8] == "0%" and row[9] == "100%" and row[12] == "100%" and row[13] == "100%", row


def test_masks_bench_checks_the_masked_answers(tmp_path):
    out = tmp_path / "masks.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/masks.py"), "--tools", "1", "--length", "32",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| bpe-4k")]
    assert [row[3] for row in rows] == ["viterbi", "marginals", "denoise_step"]
    assert all(float(row[-1].rstrip(" |")) < 1e-5 for row in rows)  # (the masked answers, against the ends at 0)


def test_eval_draws_pools_the_draws(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/eval_draws.py"), "--seeds", "1", "2", "--single", "2",
                        "--multi", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "demo_eval_draws.json").read_text())
    assert [d["seed"] for d in data["per_draw"]] == [1, 2]
    rates = data["pooled"]["grounded"]["rates"]
    assert rates["single_exact_call"]["n"] == 4 and rates["multi_right"]["n"] == 2
    pooled = rates["single_exact_call"]["rate"]
    assert pooled == sum(d["grounded"]["single_exact_call"] for d in data["per_draw"]) / 2  # equal draws: the mean
    assert "| grounded | single-call requests: exact call |" in (tmp_path / "demo_eval_draws.md").read_text()


def test_wilson_interval():
    sys.path.insert(0, str(ROOT / "bench"))
    from eval_draws import wilson

    lo, hi = wilson(90, 100)
    assert abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3
    assert abs(wilson(0, 10)[0]) < 1e-12 and wilson(10, 10)[1] > 0.9999


@pytest.mark.slow  # compiles a second copy of the numba kernels (~1 min)
@pytest.mark.parametrize("options", [[], ["--batch", "2", "--text-where-call", "30"]])
def test_constraint_ab_runs_both_versions_side_by_side(tmp_path, options):
    out = tmp_path / "ab.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/constraint_ab.py"), "--baseline", "HEAD", "--tools", "1",
                        "--repeats", "2", *options, "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("batches of 2 canvases" in out.read_text()) == bool(options)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| bpe-4k | 1 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["viterbi", "sample", "marginals", "denoise_step",
                                                           "denoise_step_whole", "support"]
    assert all(float(row.split("|")[6]) > 0 for row in rows)


@pytest.mark.slow  # compiles a second copy of the numba kernels (~1 min)
def test_engine_ab_runs_both_engines_on_the_same_calls(tmp_path):
    out = tmp_path / "engine_ab.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/engine_ab.py"), "--baseline", "HEAD", "--tools", "1",
                        "--seeds", "1", "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| tiny | 0 |")]
    assert len(rows) == 1 and float(rows[0][4]) > 0 and float(rows[0][5]) > 0
    assert rows[0][8].strip() == "yes" and rows[0][9].strip() == "True"  # same tokens, a valid call


@pytest.mark.slow  # a fresh install's first demo compiles every kernel it calls (~50 s)
def test_first_run_bench_tells_the_compiles_apart(tmp_path):
    out = tmp_path / "first_run.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/first_run.py"), "--top", "3", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = ("first, serial", "first, parallel", "second")
    rows = {cells[1].strip(): cells for cells in (line.split("|") for line in out.read_text().splitlines())
            if len(cells) == 7 and cells[1].strip() in runs}
    assert set(rows) == set(runs), out.read_text()
    compiling, precompile = ({run: float(rows[run][i]) for run in runs} for i in (4, 5))
    assert compiling["first, serial"] > 1.0 and precompile["first, serial"] == 0  # compiled afresh, at first calls
    assert precompile["first, parallel"] > 1.0  # compiled afresh, ahead, in parallel processes ...
    assert compiling["second"] < 0.5 * compiling["first, serial"]  # ... then loaded from the cache they filled
    assert sum(line.startswith("| `") for line in out.read_text().splitlines()) == 3  # --top 3 kernels listed


@pytest.mark.slow  # compiles a second copy of the token automaton's kernels
def test_token_automaton_ab_builds_both_versions(tmp_path):
    out = tmp_path / "ta.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench/token_automaton_ab.py"), "--baseline", "HEAD",
                        "--tokenizers", "bpe-4k", "--tools", "1", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| bpe-4k | 1 |")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("same")


def test_token_automaton_ab_tells_a_relabelling_from_a_different_automaton():
    """Atoms and groups numbered otherwise are the same automaton (the A/B against builds
    before session 18, which numbered atoms by hash value); a token moved to another
    atom, or an edge given another group's tokens, is not."""
    import dataclasses

    import numpy as np
    from tokenizers import Tokenizer

    from agentloop.grammar import compile_tools
    from bench.token_automaton_ab import same_automaton

    tok = Tokenizer.from_file(str(ROOT / "agentloop/model/tokenizer.json"))
    tools = json.loads((ROOT / "agentloop/data/tool_schemas.json").read_text())[:2]
    ta = compile_tools(tools, tok, "gemma4").automaton
    K = ta.n_atoms
    perm = np.random.default_rng(0).permutation(K)
    relabelled = dataclasses.replace(ta, atom_of_token=np.where(ta.atom_of_token >= 0, perm[ta.atom_of_token], -1),
                                     group_atoms=perm[ta.group_atoms])
    assert same_automaton(ta, ta) == "same"
    assert same_automaton(ta, relabelled) == "relabelled"
    moved = ta.atom_of_token.copy()
    moved[np.flatnonzero(moved == 0)[0]] = 1  # a token of atom 0 now in atom 1
    assert same_automaton(ta, dataclasses.replace(ta, atom_of_token=moved)) == "different"
    regrouped = ta.edge_group.copy()
    regrouped[0] = (regrouped[0] + 1) % (ta.group_offsets.size - 1)
    assert same_automaton(ta, dataclasses.replace(ta, edge_group=regrouped)) == "different"


def tiny_uncased_wordpiece():
    """A WordPiece of 400 tokens without capitals, trained here, with the aliases
    ``bench.tokenizers_offline.wordpiece_30k`` gives the real one (which comes with the
    bench extras, not the test extras)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from bench.tokenizers_offline import GEMMA4_TOOL_TOKENS, tool_schemas

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[SEP]", *(f"[unused{i}]" for i in range(len(GEMMA4_TOOL_TOKENS)))]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    corpus = [json.dumps(t) for t in tool_schemas("wordpiece-30k")] + [" ".join(chars), " ".join("a" + c for c in chars)]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials,
                                                              show_progress=False))
    aliases = {name: f"[unused{i}]" for i, name in enumerate(GEMMA4_TOOL_TOKENS)}
    aliases["<eos>"] = "[SEP]"
    return tok, aliases


def test_constraint_bench_replays_dfas_only_for_the_same_schemas(tmp_path):
    """The full run replays the first tokenizer's DFAs for the others' 20-tool compiles;
    an uncased WordPiece gets the tools with their capitals lower-cased, so it must build
    its own (replayed, BPE's `book_flight` needs capitals it cannot spell, and
    ``compile_tools`` refuses it)."""
    from bench.constraint import DfaReplay, compile_row
    from bench.tokenizers_offline import LOADERS, tool_schemas

    replay = DfaReplay()
    rows = []
    loaders = {"bpe-4k": LOADERS["bpe-4k"], "wordpiece-30k": tiny_uncased_wordpiece}
    for name in ("bpe-4k", "wordpiece-30k", "bpe-4k"):
        tok, aliases = loaders[name]()
        tools = [t for t in tool_schemas(name) if t["name"] == "book_flight"]
        _, row = compile_row(name, tok, aliases, tools, replay, tmp_path)
        rows.append(row["dfa_replayed"])
    assert rows == [False, False, True]
