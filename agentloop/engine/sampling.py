"""The pieces of one denoising step, each named after what it does in DiffusionGemma's sampler.

A step of the sampler (transformers' ``DiffusionGemmaGenerationMixin._denoising_step``):

1. ``temperature_at``: the linear temperature schedule (t_max at the first step, t_min at the last);
2. draw the denoiser canvas and the argmax canvas from the tempered logits, with each
   position's entropy: ``reference_draw`` in the library's random-number order, or
   ``fused_draw`` in one pass over the vocabulary (no softmax tensor, no second pass);
3. ``entropy_bound_accept``: accept the lowest-entropy positions while
   sum(H) - max(H) <= entropy_bound, keep the current token elsewhere;
4. ``renoise``: replace every position not accepted by a uniform-random token;
5. ``StableAndConfident``: stop once the argmax canvas repeats and the mean entropy is low.

With a grammar constraint, step 2 is the grammar's ``denoise_step`` instead (Viterbi canvas,
exact constrained sample, constrained entropies); steps 1, 3, 4 and 5 are shared.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from ..numba_threads import parallel_kernel


def temperature_at(cur_step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Temperature at ``cur_step``, which counts the steps *remaining* (max_steps .. 1)."""
    return t_min + (t_max - t_min) * (cur_step / max_steps)


# ---- 2. drawing the denoiser and argmax canvases ------------------------------------------


def reference_draw(tempered: torch.Tensor, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tempered (B, L, V) -> sample, argmax (B, L) int64 and entropy (B, L), as the library does.

    Draws exactly the random numbers ``generate()`` draws (one ``multinomial`` per step), so
    a run seeded like the library's reproduces its canvases. Several passes over the
    vocabulary: use it to check, not to serve.
    """
    B, L, V = tempered.shape
    probs = torch.softmax(tempered, dim=-1, dtype=torch.float32)
    sample = torch.multinomial(probs.view(-1, V), num_samples=1, generator=generator).view(B, L)
    argmax = torch.argmax(tempered, dim=-1)
    entropy = torch.distributions.Categorical(logits=tempered).entropy()
    return sample, argmax, entropy


_BLOCK = 2048  # tokens per block: the block is re-read from L1/L2, the row from memory once


@parallel_kernel(cache=True, nogil=True)
def _fused_rows(x, temperature, uniforms, argmax, sample, entropy):  # pragma: no cover - compiled
    """Per row of x (R, V): divide by the temperature in place, then argmax, entropy and an
    inverse-CDF sample, reading the row from memory once (block sums stand in for the CDF)."""
    R, V = x.shape
    nblocks = (V + _BLOCK - 1) // _BLOCK
    for r in nb.prange(R):
        row = x[r]
        bmax = np.empty(nblocks, np.float64)
        bsum = np.empty(nblocks, np.float64)  # sum of exp(x - bmax) over the block
        bsumx = np.empty(nblocks, np.float64)  # sum of (x - bmax) exp(x - bmax)
        for b in range(nblocks):
            lo = b * _BLOCK
            hi = min(V, lo + _BLOCK)
            m = -np.inf
            for i in range(lo, hi):
                v = np.float32(row[i] / temperature)
                row[i] = v
                if v > m:
                    m = v
            s = 0.0
            sx = 0.0
            for i in range(lo, hi):
                d = row[i] - m
                e = math.exp(d)
                s += e
                sx += e * d
            bmax[b] = m
            bsum[b] = s
            bsumx[b] = sx
        M = bmax.max()
        S = 0.0
        SX = 0.0
        for b in range(nblocks):
            w = math.exp(bmax[b] - M)
            S += bsum[b] * w
            SX += (bsumx[b] + bsum[b] * (bmax[b] - M)) * w
        # H = log Z - E[x - M] with Z = sum exp(x - M)
        entropy[r] = max(math.log(S) - SX / S, 0.0)
        for b in range(nblocks):
            if bmax[b] == M:
                for i in range(b * _BLOCK, min(V, (b + 1) * _BLOCK)):
                    if row[i] == M:
                        argmax[r] = i
                        break
                break
        # inverse CDF: find the block by its sum, then the token inside it
        target = uniforms[r] * S
        acc = 0.0
        chosen = nblocks - 1
        for b in range(nblocks):
            nxt = acc + bsum[b] * math.exp(bmax[b] - M)
            if nxt >= target:
                chosen = b
                break
            acc = nxt
        lo = chosen * _BLOCK
        hi = min(V, lo + _BLOCK)
        tok = -1
        for i in range(lo, hi):
            e = math.exp(row[i] - M)
            if e > 0.0:
                tok = i
                acc += e
                if acc >= target:
                    break
        sample[r] = tok


def fused_draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, L, V) float32 -> sample, argmax (B, L) int64 and entropy (B, L) float64.

    Divides ``logits`` by ``temperature`` in place (the tempered logits are the
    self-conditioning input of the next step) and reads each row once. The sample is exact
    (inverse CDF of softmax(logits / T)) but draws its own random numbers, one per position.
    """
    B, L, V = logits.shape
    if logits.device.type != "cpu":
        # On an accelerator the torch ops below are one fused-enough pass each and stay on the device.
        logits.div_(temperature)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).double()
        sample = torch.multinomial(logp.exp().view(-1, V), 1, generator=generator).view(B, L)
        return sample, logits.argmax(-1), entropy
    x = logits.detach().reshape(B * L, V).numpy()
    uniforms = torch.rand(B * L, generator=generator, dtype=torch.float64).numpy()
    argmax = np.empty(B * L, np.int64)
    sample = np.empty(B * L, np.int64)
    entropy = np.empty(B * L, np.float64)
    _fused_rows(x, float(temperature), uniforms, argmax, sample, entropy)
    return (torch.from_numpy(sample).view(B, L), torch.from_numpy(argmax).view(B, L),
            torch.from_numpy(entropy).view(B, L))


# ---- 3-5. acceptance, renoising, stopping ----------------------------------------------------


def entropy_bound_accept(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """entropy (B, L) -> accepted (B, L) bool: the k lowest-entropy positions with
    sum_{i<=k} H_i - max_{i<=k} H_i <= entropy_bound (an upper bound on their mutual information)."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= entropy_bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def renoise(canvas: torch.Tensor, accepted: torch.Tensor, vocab_size: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """Replace each position not accepted by a uniform-random token (the model's noise)."""
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(accepted, canvas, noise)


class StableAndConfident:
    """Adaptive stop: the argmax canvas equals the one of the last ``stability_threshold``
    steps and the mean entropy is below ``confidence_threshold``."""

    def __init__(self, stability_threshold: int, confidence_threshold: float) -> None:
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self._history: list[torch.Tensor] = []

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> bool:
        n = self.stability_threshold
        stable = n == 0 or (len(self._history) == n and all(bool(torch.equal(h, argmax)) for h in self._history))
        if n:
            self._history = (self._history + [argmax.clone()])[-n:]
        return stable and float(entropy.float().mean()) < self.confidence_threshold
