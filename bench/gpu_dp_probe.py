"""Probe: how fast can one GPU thread block run a pass of the canvas DP?

The host runs the DP over the automaton (``grammar/canvas.py``); on a GPU only the
vocabulary passes run on the device. Moving the DP there means 256 positions in sequence,
each a sparse (states x edges) product. This probe times the plainest form of it, on
random automata of the sizes of 1, 5 and 20 tools at Gemma's vocabulary (states, edges,
atoms as ``bench/constraint.py`` reports them): one Triton program per canvas that, at
each position, gathers alpha[t, src] * score[t, atom] for every edge, adds it into
alpha[t + 1, dst] with atomics in global memory, waits at a block barrier and, optionally,
rescales the row by its sum. Checked against a float64 torch loop. Also timed: a batch of
canvases (one program each), a plain loop of 256 ``index_add_`` launches, and the pass
with its messages on chip (``on_chip_pass``: gathers between register tensors and a
segmented scan, no atomics and no trip through global memory between positions).

    python bench/gpu_dp_probe.py        # needs a CUDA GPU; writes bench/results/gpu_dp_probe.md

Under ``TRITON_INTERPRET=1`` (no GPU) ``--length 6 --tiny`` runs it on the CPU for a
check of the kernel, not its speed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import triton
import triton.language as tl

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_dp_probe.md"
#: (states, edges, atoms) of the 1, 5 and 20 tool grammars at Gemma's 262k vocabulary.
SIZES = ((579, 2648, 144), (2716, 18363, 347), (49014, 337927, 1692))


@triton.jit
def forward_pass(src_ptr, dst_ptr, atom_ptr, score_ptr, alpha_ptr, E, S, K, L,
                 BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, NORM: tl.constexpr):
    """One canvas (program): alpha (L + 1, S), row 0 set, rows 1.. zero -> filled."""
    b = tl.program_id(0)
    alpha_ptr += b * (L + 1) * S
    score_ptr += b * L * K
    e0 = tl.arange(0, BLOCK_E)
    s0 = tl.arange(0, BLOCK_S)
    for t in range(L):
        for eb in range(0, E, BLOCK_E):
            idx = eb + e0
            m = idx < E
            src = tl.load(src_ptr + idx, mask=m, other=0)
            dst = tl.load(dst_ptr + idx, mask=m, other=0)
            atom = tl.load(atom_ptr + idx, mask=m, other=0)
            # .cg: from L2, where the atomics of the last position landed
            a = tl.load(alpha_ptr + t * S + src, mask=m, other=0.0, cache_modifier=".cg")
            w = tl.load(score_ptr + t * K + atom, mask=m, other=0.0)
            tl.atomic_add(alpha_ptr + (t + 1) * S + dst, a * w, mask=m, sem="relaxed")
        tl.debug_barrier()
        if NORM:  # rescale the row by its sum, as the host's passes keep their messages in range
            acc = tl.zeros([BLOCK_S], dtype=tl.float32)
            for sb in range(0, S, BLOCK_S):
                j = sb + s0
                acc += tl.load(alpha_ptr + (t + 1) * S + j, mask=j < S, other=0.0, cache_modifier=".cg")
            inv = 1.0 / tl.maximum(tl.sum(acc), 1e-30)
            tl.debug_barrier()
            for sb in range(0, S, BLOCK_S):
                j = sb + s0
                v = tl.load(alpha_ptr + (t + 1) * S + j, mask=j < S, other=0.0, cache_modifier=".cg")
                tl.store(alpha_ptr + (t + 1) * S + j, v * inv, mask=j < S)
            tl.debug_barrier()


@triton.jit
def _segmented_add(v1, f1, v2, f2):
    """The combine of a sum restarting where the flag is set (a new destination)."""
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def on_chip_pass(src_ptr, atom_ptr, first_ptr, last_ptr, score_ptr, alpha_ptr, E, S, K, L,
                 BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
    """The same pass, rescaled, with the messages in registers: edges sorted by
    destination, one lane each (E <= BLOCK_E), states one lane each (S <= BLOCK_S). At
    each position: gather alpha[src] from the state lanes (``tl.gather``, through shared
    memory), weigh by the atom's score, a segmented sum over the edge lanes (a scan that
    restarts at each destination's first edge), gather each state's total from its last
    edge, rescale. Rows go to global memory only to be kept (the factors would read them)."""
    b = tl.program_id(0)
    alpha_ptr += b * (L + 1) * S
    score_ptr += b * L * K
    e = tl.arange(0, BLOCK_E)
    s = tl.arange(0, BLOCK_S)
    src = tl.load(src_ptr + e, mask=e < E, other=0)
    atom = tl.load(atom_ptr + e, mask=e < E, other=0)
    first = tl.load(first_ptr + e, mask=e < E, other=1)  # 1 where a destination's edges start
    last = tl.load(last_ptr + s, mask=s < S, other=-1)  # each state's last incoming edge, -1: none
    alpha = tl.where(s == 0, 1.0, 0.0)  # (BLOCK_S,) float32
    tl.store(alpha_ptr + s, alpha, mask=s < S)
    for t in range(L):
        w = tl.load(score_ptr + t * K + atom, mask=e < E, other=0.0)  # (BLOCK_E,) no wait on alpha
        v = tl.gather(alpha, src, axis=0) * w
        c, _ = tl.associative_scan((v, first), 0, _segmented_add)
        nxt = tl.where(last >= 0, tl.gather(c, tl.maximum(last, 0), axis=0), 0.0)
        alpha = nxt / tl.maximum(tl.sum(nxt, axis=0), 1e-30)
        tl.store(alpha_ptr + (t + 1) * S + s, alpha, mask=s < S)


def by_destination(src: torch.Tensor, dst: torch.Tensor, atom: torch.Tensor, S: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edges sorted by destination: (src, atom, first flag) (E,) int32, and each
    state's last incoming edge (S,) int32 (-1: none)."""
    order = torch.argsort(dst.long(), stable=True)
    d = dst.long()[order]
    first = torch.ones_like(d)
    first[1:] = (d[1:] != d[:-1]).long()
    last = torch.full((S,), -1, dtype=torch.long, device=d.device)
    last.scatter_reduce_(0, d, torch.arange(d.numel(), device=d.device), "amax")
    return src[order], atom[order], first.int(), last.int()


def random_automaton(S: int, E: int, K: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """(src, dst, atom) int32 (E,): mostly short forward hops, as a grammar's chains are."""
    g = np.random.default_rng(seed)
    src = g.integers(0, S, E)
    dst = np.clip(src + g.integers(-3, 30, E), 0, S - 1)
    atom = g.integers(0, K, E)
    return [torch.from_numpy(v.astype(np.int32)).to(device) for v in (src, dst, atom)]


def reference(src: torch.Tensor, dst: torch.Tensor, atom: torch.Tensor, score: torch.Tensor, S: int, L: int
              ) -> torch.Tensor:
    """The normalised pass in float64 torch ops."""
    alpha = torch.zeros(L + 1, S, device=score.device, dtype=torch.float64)  # (L + 1, S)
    alpha[0, 0] = 1
    for t in range(L):
        alpha[t + 1].index_add_(0, dst.long(), alpha[t, src.long()] * score[t, atom.long()].double())
        alpha[t + 1] /= alpha[t + 1].sum().clamp_min(1e-30)
    return alpha


def median_ms(fn: Callable[[], None], sync: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=256, help="canvas positions (default 256)")
    ap.add_argument("--tiny", action="store_true", help="one tiny automaton (a check under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeats = 15 if device == "cuda" else 1
    L = args.length
    lines = []
    for S, E, K in ((37, 150, 9),) if args.tiny else SIZES:
        src, dst, atom = random_automaton(S, E, K, device)
        score = torch.rand(L, K, device=device) + 0.01  # (L, K) atom scores
        for block_e in (1024, 4096):
            for norm in (False, True):
                alpha = torch.zeros(L + 1, S, device=device)  # (L + 1, S)

                def run(block_e: int = block_e, norm: bool = norm, alpha: torch.Tensor = alpha) -> None:
                    alpha.zero_()
                    alpha[0, 0] = 1
                    forward_pass[(1,)](src, dst, atom, score, alpha, E, S, K, L, BLOCK_E=block_e, BLOCK_S=1024,
                                       NORM=norm, num_warps=8 if block_e >= 2048 else 4)

                run()
                sync()
                err = "-"
                if norm and S < 5000:
                    ref = reference(src, dst, atom, score, S, L)
                    err = f"{float(((alpha.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max()):.1e}"
                ms = median_ms(run, sync, repeats)
                lines.append(f"| {S} | {E} | 1 | {block_e} | {'yes' if norm else 'no'} | {ms:.3f} | "
                             f"{1e3 * ms / L:.2f} | {err} |")
                print(lines[-1], flush=True)
        for B in (4, 16):
            alpha = torch.zeros(B, L + 1, S, device=device)  # (B, L + 1, S)
            scores = torch.rand(B, L, K, device=device) + 0.01  # (B, L, K)

            def run_batch(B: int = B, alpha: torch.Tensor = alpha, scores: torch.Tensor = scores) -> None:
                alpha.zero_()
                alpha[:, 0, 0] = 1
                forward_pass[(B,)](src, dst, atom, scores, alpha, E, S, K, L, BLOCK_E=1024, BLOCK_S=1024,
                                   NORM=True, num_warps=4)

            run_batch()
            ms = median_ms(run_batch, sync, repeats)
            lines.append(f"| {S} | {E} | {B} | 1024 | yes | {ms:.3f} | {1e3 * ms / L:.2f} | - |")
            print(lines[-1], flush=True)
        if E <= 1 << 15:  # the messages on chip: one lane per edge and per state
            srt = by_destination(src, dst, atom, S)
            block_e, block_s = triton.next_power_of_2(E), triton.next_power_of_2(S)
            alpha = torch.zeros(L + 1, S, device=device)  # (L + 1, S)

            def run_on_chip(alpha: torch.Tensor = alpha, block_e: int = block_e, block_s: int = block_s) -> None:
                on_chip_pass[(1,)](*srt[:2], srt[2], srt[3], score, alpha, E, S, K, L, BLOCK_E=block_e,
                                   BLOCK_S=block_s, num_warps=8 if block_e >= 4096 else 4)

            try:
                run_on_chip()
                sync()
                ref = reference(src, dst, atom, score, S, L)
                err = f"{float(((alpha.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max()):.1e}"
                ms = median_ms(run_on_chip, sync, repeats)
                lines.append(f"| {S} | {E} | 1 | on chip, {block_e} | yes | {ms:.3f} | {1e3 * ms / L:.2f} | {err} |")
            except Exception as exc:  # noqa: BLE001 - a size the compiler refuses is a finding too
                lines.append(f"| {S} | {E} | 1 | on chip, {block_e} | yes | failed: {type(exc).__name__} | - | - |")
            print(lines[-1], flush=True)
        alpha64 = torch.zeros(L + 1, S, device=device, dtype=torch.float64)

        def torch_loop() -> None:
            alpha64.zero_()
            alpha64[0, 0] = 1
            for t in range(L):
                alpha64[t + 1].index_add_(0, dst.long(), alpha64[t, src.long()] * score[t, atom.long()].double())

        lines.append(f"| {S} | {E} | 1 | torch index_add_ x {L} | no | {median_ms(torch_loop, sync, 5):.3f} | - | - |")
        print(lines[-1], flush=True)
    if device != "cuda":
        return  # a check of the kernel, not a measurement
    header = [
        "# One thread block per canvas DP pass on the GPU (probe)", "",
        "Command: `python bench/gpu_dp_probe.py`  ",
        f"Machine: {platform.platform()}; GPU {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"triton {triton.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
        f"L = {L}; random automata of the 1 / 5 / 20 tool grammars' sizes at 262k; medians of {repeats}.", "",
        "| states | edges | canvases | edges per block | rescaled | ms per pass | us per position | max rel err |",
        "|---|---|---|---|---|---|---|---|"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
