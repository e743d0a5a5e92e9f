"""The one pass over a step's logits (per atom: sums, max, its lowest token) against its
definition, in each implementation: the compiled host scan, its torch twin that runs where
the logits are (``device_passes``), with chunk layouts that split and pad atoms, and the
fused Triton kernel (here in Triton's interpreter; on a GPU with ``-m gpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agentloop.grammar import canvas as dp
from agentloop.grammar import compile_tools, device_passes
from agentloop.grammar.compiled import CompiledGrammar

TOOLS = json.loads((Path(__file__).parents[1] / "agentloop/data/tool_schemas.json").read_text())
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(V: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Logits (7, V) with ties, -inf entries, an all -inf row, an all -inf atom, an
    allowed token far above the rest of its row, a row of wide spread and one whose atom 1
    lies 200 nats below the rest; the atom of each token (-1: never allowed), K = 4 atoms
    of which atom 3 holds no token."""
    rng = np.random.default_rng(V)
    K = 4
    atom_of = rng.integers(-1, K - 1, V).astype(np.int32)
    x = np.round(rng.normal(0, 2, (7, V)), 1).astype(np.float32)  # rounded: ties
    x[5] = rng.normal(0, 60, V)  # as at temperature 0.1: atoms tens to hundreds of nats apart
    x[6, atom_of == 1] -= 200.0  # as a digit the grammar forces where the model wants a letter
    x[1, rng.random(V) < 0.4] = -np.inf
    x[2] = -np.inf
    x[3, atom_of == 0] = -np.inf
    x[4, np.flatnonzero(atom_of >= 0)[:1]] = 400.0  # the other atoms weigh ~1e-174: below any float32 exp
    return x, atom_of, K


def _check_atom_scores(x, atom_of, K, rowmax, asum, asumx, amax, aarg):
    for n in range(x.shape[0]):
        m = rowmax[n]  # the shift of the sums: finite, at or above every allowed logit
        allowed = x[n][atom_of >= 0]
        assert np.isfinite(m) and (not allowed.size or m >= allowed.max())
        for k in range(K):
            xs = x[n][atom_of == k].astype(np.float64)
            e = np.exp(xs - m)
            # float32's exp of x - m is good to ~|x - m| * 6e-8 (relative): an atom tens of
            # nats below the row's best is known to a few 1e-6, which no posterior notices
            gap = m - xs.max() if np.isfinite(xs).any() else 0.0
            assert asum[n, k] == pytest.approx(e.sum(), rel=max(1e-6, 1e-7 * gap), abs=1e-300)
            with np.errstate(invalid="ignore"):  # 0 * -inf where x = -inf, masked
                ex = np.where(e > 0, e * (xs - m), 0.0)
            assert asumx[n, k] == pytest.approx(ex.sum(), rel=1e-5, abs=1e-12)
            finite = np.isfinite(xs)
            want = xs.max() if finite.any() else -np.inf
            assert amax[n, k] == want
            if finite.any():
                assert aarg[n, k] == np.flatnonzero((atom_of == k) & (x[n] == want))[0]
            else:
                assert aarg[n, k] == -1


VOCABS = [1, 3, 4, 7, 13, 64, 300]
# 5000: atoms of ~1250 tokens, several blocks of the scan's float32 sums; 9000: rows read in
# token order (canvas._SCATTER_FROM)
HOST_VOCABS = VOCABS + [5000, 9000]


@pytest.mark.parametrize("V", HOST_VOCABS)
def test_host_scan_equals_the_definition(V):
    """(The maxima alone, as Viterbi asks, give the same rowmax, amax and aarg: past
    _SCATTER_FROM they are streamed in token order, and rowmax came back 0 there.)"""
    x, atom_of, K = _case(V)
    for rows in (x, x[1:]):
        full = dp.reduce_atoms(rows, dp.sorted_atoms(atom_of, K), True, True)
        _check_atom_scores(rows, atom_of, K, *full)
        maxima = dp.reduce_atoms(rows, dp.sorted_atoms(atom_of, K), False, False)
        for i in (0, 3, 4):  # rowmax, amax, aarg
            np.testing.assert_array_equal(maxima[i], full[i])


def _device_scores(x: np.ndarray, atom_of: np.ndarray, K: int, device: str, kernel: str) -> None:
    """The statistics against their definition, as the arrays the host's passes take (one
    type and layout each, as the compiled kernels were compiled for); without the
    x-weighted sums, and without any sums (Viterbi), the same maxima and sums."""
    N = x.shape[0]
    for chunk in (None,) if kernel == "triton" else (None, 1, 4, 64):  # None: the layout's own (the tiles ignore it)
        layout = device_passes.atom_layout(atom_of, K, torch.device(device), chunk=chunk)
        xt = torch.from_numpy(x).to(device)
        scores = device_passes.reduce_atoms(xt, layout, True, True, kernel=kernel)
        _check_atom_scores(x, atom_of, K, *scores[1:])
        for a, dtype, shape in zip(scores[1:], (np.float64, np.float64, np.float64, np.float32, np.int32),
                                   ((N,), (N, K), (N, K), (N, K), (N, K))):
            assert a.dtype == dtype and a.shape == shape and a.flags.c_contiguous and a.flags.aligned
        for want_sum in (True, False):
            fewer = device_passes.reduce_atoms(xt, layout, want_sum, False, kernel=kernel)
            for i in (1, 4, 5) if want_sum else (4, 5):  # rowmax (Viterbi's is never read), amax, aarg
                np.testing.assert_array_equal(fewer[i], scores[i])
            if want_sum:
                np.testing.assert_array_equal(fewer[2], scores[2])


@pytest.mark.parametrize("V", VOCABS)
def test_torch_passes_equal_the_definition(V):
    _device_scores(*_case(V), device="cpu", kernel="torch")


def _marginals_and_draws(V: int, device: str, kernel: str) -> None:
    """The marginals write and the token draw of ``kernel`` against the torch ops'. The
    marginals: the same float32 numbers, -inf at tokens never allowed (nan logits
    there too) and where an atom's factor is 0. The draws: the same tokens for the same
    uniforms, at every position and for uniforms that reach the atom's first and last
    tokens; each token inside its atom."""
    x, atom_of, K = _case(V)
    x[0, atom_of < 0] = np.nan  # never allowed: -inf all the same
    xt = torch.from_numpy(x).to(device)
    layout = device_passes.atom_layout(atom_of, K, torch.device(device))
    rowmax, _, asum, _, amax, aarg = device_passes.reduce_atoms(xt, layout, True, False, kernel="torch")
    log_f = np.log(np.random.default_rng(V).random((x.shape[0], K)))
    log_f[:, 1] = -np.inf  # an atom the canvas never takes here
    refs = device_passes.atom_references(log_f, amax, rowmax.cpu().numpy().astype(np.float64))
    want = device_passes.log_marginals(xt, refs, layout.index, kernel="torch")
    got = torch.full_like(xt, 7.0)
    assert device_passes.log_marginals(xt, refs, layout.index, out=got, kernel=kernel) is got
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isneginf(got[:, torch.from_numpy(atom_of < 0).to(device)]).all()
    rng = np.random.default_rng(V + 1)
    for n in range(x.shape[0]):
        usable = np.flatnonzero(asum[n] > 0)
        if not usable.size:
            continue
        far = n == 6 and 1 in usable and (atom_of == 1).sum() >= 3
        atoms = np.full(40, 1) if far else rng.choice(usable, 40)  # (40,) the sampled atom of each draw
        u = np.concatenate([rng.random(38), [0.0, 1.0 - 1e-12]])  # the atom's best token; the far end
        rows = torch.full((40,), n, device=device)
        draws = [device_passes.tokens_in_atoms(xt[rows], layout, atoms, aarg[n, atoms], amax[n, atoms],
                                               np.full(40, rowmax[n].item()), asum[n, atoms], u, kernel=k)
                 for k in ("torch", kernel)]
        assert draws[0].tolist() == draws[1].tolist()
        assert (atom_of[draws[1]] == atoms).all()
        if far:  # weighed from the atom's own best: its tokens are drawn, not only its best (exp(-200) is 0 in float32)
            assert len(set(draws[1].tolist())) > 1


@pytest.mark.parametrize("V", VOCABS)
def test_torch_marginals_and_draws_run(V):
    """The torch ops' marginals are -inf at the tokens never allowed and their draws land
    inside the sampled atoms (the kernels' check, run with the torch ops on both sides, so
    that its set-up runs where triton is missing)."""
    _marginals_and_draws(V, "cpu", "torch")


def _step_through_kernels() -> None:
    """A whole ``denoise_step`` with the vocabulary passes in the Triton kernels (logits on
    the CPU: the interpreter) against the host's step: the same Viterbi canvas and sample,
    the same marginals and entropies up to float rounding."""
    from agentloop.grammar import byte_tokenizer

    used = set()

    def use_kernel(kernel: str, device: torch.device, name: str) -> bool:
        used.add(name)
        return kernel != "torch"

    device_passes._use_kernel = use_kernel
    CompiledGrammar._device_passes_on_cpu = True
    g = compile_tools(TOOLS[:2], byte_tokenizer(), "gemma4")
    logits = torch.randn(2, 12, g.vocab.size + 5, generator=torch.Generator().manual_seed(0)) * 4
    CompiledGrammar._device_passes_on_cpu = False
    host = g.denoise_step(logits, generator=torch.Generator().manual_seed(0), partial=True)
    CompiledGrammar._device_passes_on_cpu = True
    dev = g.denoise_step(logits, generator=torch.Generator().manual_seed(0), partial=True)
    assert dev.argmax == host.argmax and dev.sample == host.sample
    assert torch.allclose(dev.log_marginals, host.log_marginals, atol=1e-4)
    assert torch.allclose(dev.entropy, host.entropy, atol=1e-5)
    assert used == {"tile_stats", "draw_in_atoms", "log_marginals"}, used
    assert not device_passes._kernel_failed  # each ran: none fell back to the torch ops


# The interpreted checks, in parts that run in parallel under `pytest -n` (the interpreter
# runs a kernel's programs one by one in Python: 30-45 s for all three in one process).
_INTERPRETED = {
    "reductions, marginals and draws": (
        "for V in t.VOCABS: t._device_scores(*t._case(V), 'cpu', 'triton')\n"
        "for V in t.VOCABS + [5000]: t._marginals_and_draws(V, 'cpu', 'triton')"),
    "a whole step": "t._step_through_kernels()",
    # tiles of 5 tokens read 2 at a time: atoms cut into several tiles, tiles read in
    # several sweeps, a last tile shorter than the others, draws that start their walk in
    # a later tile and walk on, 2 tokens a block
    "atoms over many tiles": (
        "t.device_passes._TILE, t.device_passes._TILE_BLOCK, t.device_passes._DRAW_BLOCK = 5, 2, 2\n"
        "for V in (7, 64): t._device_scores(*t._case(V), 'cpu', 'triton')\n"
        "t._marginals_and_draws(64, 'cpu', 'triton')"),
}


@pytest.mark.parametrize("part", list(_INTERPRETED))
def test_fused_kernel_equals_the_definition(part):
    """The Triton kernels in Triton's interpreter, on CPU tensors: the atom reduction
    against its definition, the marginals write and the token draw against the torch ops,
    a whole step through them against the host's.
    The interpreter must be on before triton is first imported, so each part runs in a
    process of its own."""
    pytest.importorskip("triton", reason="the fused kernels need triton (it comes with CUDA builds of torch)")
    code = "import test_device_passes as t\n" + _INTERPRETED[part]
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_layout_groups_each_atom_in_whole_chunks():
    rng = np.random.default_rng(0)
    atom_of = rng.integers(-1, 5, 1000).astype(np.int32)
    layout = device_passes.atom_layout(atom_of, 6, torch.device("cpu"))  # atom 5 holds no token
    C = layout.chunk
    gather, weight = layout.gather.numpy(), layout.weight.numpy()
    assert C > 1 and gather.size % C == 0 and layout.chunk_atom.numel() * C == gather.size
    slot_atom = np.repeat(layout.chunk_atom.numpy(), C)
    assert (atom_of[gather] == slot_atom).all()  # pads repeat a token of their own atom
    real = gather[weight == 1]
    assert sorted(real.tolist()) == np.flatnonzero(atom_of >= 0).tolist()  # each allowed token once
    assert gather.size * 4 <= 5 * real.size  # padding adds at most a quarter


@pytest.mark.parametrize("framed", [False, True])
def test_atom_references_equal_their_definition(framed):
    """Each atom's reference and shift, against their definition in numpy: where the atom
    has a usable logit and mass, its best logit and log F + (amax - rowmax) (or + the
    frame) in float64, rounded once to float32; elsewhere, and in column K (the tokens
    never allowed), 0 and -inf. Atoms with no mass (log F -inf or nan), no usable logit
    (amax -inf), gaps as a -1e20 mask makes them."""
    rng = np.random.default_rng(3)
    N, K = 7, 11
    log_f = np.log(rng.random((N, K)))
    log_f[rng.random((N, K)) < 0.2] = -np.inf
    log_f[0, 3] = np.nan
    amax = rng.normal(size=(N, K)).astype(np.float32)
    amax[rng.random((N, K)) < 0.2] = -np.inf
    amax[1, 2] = np.float32(-1e20)
    rowmax = rng.normal(size=N) + 3.0
    frame = rng.normal(size=(N, K)) * 50 if framed else None
    refs = device_passes.atom_references(log_f, amax, rowmax, frame)
    assert refs.shape == (2, N, K + 1) and refs.dtype == np.float32
    usable = (log_f > -np.inf) & (amax > -np.inf)
    gap = frame if framed else amax.astype(np.float64) - rowmax[:, None]
    with np.errstate(invalid="ignore"):
        want_shift = np.where(usable, log_f + gap, -np.inf).astype(np.float32)
    np.testing.assert_array_equal(refs[0, :, :K], np.where(usable, amax, np.float32(0.0)))
    np.testing.assert_array_equal(refs[1, :, :K], want_shift)
    assert (refs[0, :, K] == 0).all() and np.isneginf(refs[1, :, K]).all()
    assert usable.any() and not usable.all()
    out = np.full((2, N, K + 1), 7.0, np.float32)  # (as a step writes them into page-locked memory)
    assert device_passes.atom_references(log_f, amax, rowmax, frame, out=out) is out
    np.testing.assert_array_equal(out, refs)
    with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous float32 array of shape \(2, 7, 12\)"):
        device_passes.atom_references(log_f, amax, rowmax, frame, out=np.empty((2, N, K), np.float32))


def test_kernels_take_whole_tensors_where_a_launch_covers_every_row():
    """A launch over all rows takes the tensors themselves (a step's canvas on a GPU: no
    slicing); a launch over some rows, a view of exactly those."""
    t = torch.arange(12.0).view(6, 2)
    assert device_passes._rows(t, slice(0, 6)) is t
    part = device_passes._rows(t, slice(2, 5))
    assert torch.equal(part, t[2:5]) and part.data_ptr() == t[2].data_ptr()


def test_host_copies_are_plain_memory_off_cuda():
    """Off a CUDA device the host tensors are plain memory (pinning needs a driver), and
    a CPU tensor's copy to the host is its own memory."""
    assert not device_passes.host_tensor((2, 3), torch.float32, torch.device("cpu")).is_pinned()
    t = torch.arange(6.0)
    assert np.shares_memory(device_passes.to_host(t), t.numpy())


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("V", VOCABS + [5000])
def test_cuda_passes_equal_the_definition(V, kernel):
    _device_scores(*_case(V), device="cuda", kernel=kernel)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("V", VOCABS + [5000])
def test_cuda_marginals_and_draws_equal_the_torch_ops(V):
    _marginals_and_draws(V, "cuda", "triton")


@pytest.mark.gpu
@CUDA
def test_cuda_copies_go_through_page_locked_memory():
    """A copy from or to pageable memory goes through the driver's own page-locked buffer
    (a second copy on the host, at about half the bandwidth): the host tensors the step's
    references go out from are page-locked, and what comes back (its statistics, its
    tokens) lands in page-locked memory."""
    cuda = torch.device("cuda")
    assert device_passes.host_tensor((2, 3), torch.float32, cuda).is_pinned()
    t = torch.arange(12.0, device=cuda).view(3, 4)
    host = device_passes.to_host(t)
    np.testing.assert_array_equal(host, np.arange(12.0).reshape(3, 4))
    assert torch.from_numpy(host).is_pinned()


@pytest.mark.gpu
@CUDA
def test_cuda_kernels_with_atoms_of_many_tiles(monkeypatch):
    """The tests' atoms fit one tile of the default size: on the GPU too, atoms folded
    from many tiles, tiles read in many sweeps and draws that start in a later tile."""
    monkeypatch.setattr(device_passes, "_TILE", 64)
    monkeypatch.setattr(device_passes, "_TILE_BLOCK", 16)
    monkeypatch.setattr(device_passes, "_DRAW_BLOCK", 32)
    _device_scores(*_case(5000), device="cuda", kernel="triton")
    _marginals_and_draws(5000, "cuda", "triton")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_step_matches_the_host_step(btok, monkeypatch, fused):
    """Logits on a GPU: the same Viterbi canvas and, from the same random numbers, the same
    sample as the host; the same marginals and entropies, on the logits' device."""
    monkeypatch.setattr(device_passes, "_triton_available", lambda name="": fused)
    monkeypatch.setattr(device_passes, "_kernel_failed", {})
    g = compile_tools(TOOLS[:4], btok, "gemma4")
    for seed in range(3):
        logits = torch.randn(2, 48, g.vocab.size + 5, generator=torch.Generator().manual_seed(seed)) * 4
        host = g.denoise_step(logits, generator=torch.Generator().manual_seed(seed), partial=True)
        dev = g.denoise_step(logits.cuda(), generator=torch.Generator().manual_seed(seed), partial=True)
        assert dev.log_marginals.is_cuda
        assert not device_passes._kernel_failed  # (with fused, each kernel ran: none fell back to torch)
        assert dev.argmax == host.argmax and dev.sample == host.sample
        assert torch.allclose(dev.log_marginals.cpu(), host.log_marginals, atol=1e-4)
        assert torch.allclose(dev.entropy, host.entropy, atol=1e-5)


def test_cpu_tensors_take_the_host_scan_unless_asked(btok, monkeypatch):
    """Only CUDA logits (or the tests' switch) take the torch passes: the compiled scan is
    faster on the CPU."""
    calls = []
    real = device_passes.reduce_atoms
    monkeypatch.setattr(device_passes, "reduce_atoms", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = compile_tools(TOOLS[:1], btok, "gemma4")
    logits = torch.randn(16, g.vocab.size)
    g.viterbi(logits)
    assert not calls
    monkeypatch.setattr(CompiledGrammar, "_device_passes_on_cpu", True)
    g.viterbi(logits)
    assert calls


def test_a_failing_fused_kernel_falls_back_to_torch_with_a_warning(monkeypatch):
    """"auto" prefers the kernel: if it fails to build or run, the step goes on in torch
    and says why, and that kernel (only) is not tried again; asked for by name, the failure
    is raised."""
    def broken(*args):
        raise RuntimeError("no PTX for this card")

    monkeypatch.setattr(device_passes, "_reduce_atoms_triton", broken)
    monkeypatch.setattr(device_passes, "_kernel_failed", {})
    monkeypatch.setattr(device_passes, "_triton_available", lambda name="": name not in device_passes._kernel_failed)
    x, atom_of, K = _case(64)
    layout = device_passes.atom_layout(atom_of, K, torch.device("cpu"))
    xt = torch.from_numpy(x)
    with pytest.raises(RuntimeError, match="no PTX"):
        device_passes.reduce_atoms(xt, layout, True, True, kernel="triton")
    # "auto" on a CUDA device, here with the logits on the CPU
    monkeypatch.setattr(device_passes, "_use_kernel",
                        lambda kernel, device, name: kernel != "torch" and device_passes._triton_available(name))
    with pytest.warns(RuntimeWarning, match="Triton kernel tile_stats .*failed .*no PTX.*using torch ops"):
        got = device_passes.reduce_atoms(xt, layout, True, True)
    want = device_passes._reduce_atoms_torch(xt, layout, True, True)
    assert torch.equal(got[0], want[0]) and all(np.array_equal(a, b) for a, b in zip(got[1:], want[1:]))
    assert not device_passes._triton_available("tile_stats")  # not tried again in this process
    assert device_passes._triton_available("log_marginals")  # the other kernels are
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the torch ops straight away
        device_passes.reduce_atoms(xt, layout, True, True)
