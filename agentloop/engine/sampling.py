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

from ..grammar.float32_math import (KEY_NAN, KEY_NEG_INF, bits_to_float, exp_nonpositive, exp_sums, float_to_bits,
                                   key_to_bits, order_key)
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


# The row is read from memory once, a block at a time, and each block re-read from L1; the
# loops over a block vectorise: the temperature's division, the max (over the floats'
# order keys: a float max does not vectorise) and exp (float32_math's, in float32; numba
# hands math.exp to libm one element at a time, which made this pass 7.9 ms at V=4096
# and 279 ms at 262k). Terms are summed in float32 over sub-blocks of a few per lane and
# in float64 across them, as in the grammar's scan; the sub-block sums also locate the
# sample, so its walk over tokens is at most one sub-block long.
_BLOCK = 2048  # tokens per block (8 KB of float32: stays in L1 between its two loops)
_SUB = 256  # tokens per float32 partial sum


@parallel_kernel(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _fused_rows(x_bits, temperature, uniforms, argmax, sample, entropy):  # pragma: no cover - compiled
    """Per row of x (R, V) (as int32 bits, written back tempered): divide by the
    temperature in place, then argmax, entropy and an inverse-CDF sample. A nan logit is
    never the argmax and makes the row's entropy nan."""
    R, V = x_bits.shape
    nblocks = (V + _BLOCK - 1) // _BLOCK
    nsub = (V + _SUB - 1) // _SUB
    per_block = _BLOCK // _SUB
    for r in nb.prange(R):
        row = x_bits[r]
        bmax = np.empty(nblocks, np.float32)  # each block's best logit
        sub = np.empty(nsub, np.float32)  # sum of exp(x - bmax) over each sub-block
        bsum = np.empty(nblocks, np.float64)  # ... over each block
        bsumx = np.empty(nblocks, np.float64)  # sum of (x - bmax) exp(x - bmax) over each block
        for b in range(nblocks):
            block = row[b * _BLOCK:min(V, (b + 1) * _BLOCK)]
            top = KEY_NEG_INF
            for i in range(block.shape[0]):
                v = np.float32(bits_to_float(block[i]) / temperature)
                bits = float_to_bits(v)
                block[i] = bits
                key = order_key(bits)
                top = max(top, KEY_NEG_INF if key == KEY_NAN else key)
            m = bits_to_float(key_to_bits(top))
            bmax[b] = m
            s = 0.0
            sx = 0.0
            if top <= KEY_NEG_INF:  # no weight in the block (x - m would be nan)
                sub[b * per_block:b * per_block + (block.shape[0] + _SUB - 1) // _SUB] = 0.0
                bsum[b] = 0.0
                bsumx[b] = 0.0
                continue
            for j0 in range(0, block.shape[0], _SUB):
                ps, psx = exp_sums(block[j0:j0 + _SUB], m)
                sub[b * per_block + j0 // _SUB] = ps
                s += ps
                sx += psx
            bsum[b] = s
            bsumx[b] = sx
        M = np.float64(bmax.max())
        S = 0.0
        SX = 0.0
        for b in range(nblocks):
            if bsum[b] == 0.0:  # (no weight: its -inf best would make 0 * -inf below; a nan stays)
                continue
            w = math.exp(np.float64(bmax[b]) - M)
            S += bsum[b] * w
            SX += (bsumx[b] + bsum[b] * (np.float64(bmax[b]) - M)) * w
        # H = log Z - E[x - M] with Z = sum exp(x - M)
        entropy[r] = max(math.log(S) - SX / S, 0.0)
        argmax[r] = 0
        for b in range(nblocks):
            if np.float64(bmax[b]) == M:
                for i in range(b * _BLOCK, min(V, (b + 1) * _BLOCK)):
                    if np.float64(bits_to_float(row[i])) == M:
                        argmax[r] = i
                        break
                break
        # inverse CDF: the block by its sum, the sub-block by its own, then the token
        target = uniforms[r] * S
        acc = 0.0
        chosen = -1  # (rounding may leave the target past the last sum: the last sub-block with weight)
        chosen_acc = 0.0
        for j in range(nsub):
            if sub[j] <= np.float32(0.0):
                continue
            nxt = acc + np.float64(sub[j]) * math.exp(np.float64(bmax[j // per_block]) - M)
            chosen, chosen_acc = j, acc
            if nxt >= target:
                break
            acc = nxt
        if chosen < 0:  # no weight anywhere (every logit -inf or nan)
            sample[r] = argmax[r]
            continue
        acc = chosen_acc
        b = chosen // per_block
        scale = math.exp(np.float64(bmax[b]) - M)
        m = bmax[b]
        tok = -1
        for i in range(chosen * _SUB, min(V, (chosen + 1) * _SUB)):
            e = np.float64(exp_nonpositive(bits_to_float(row[i]) - m)) * scale
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
    (inverse CDF of softmax(logits / T)) but draws its own random numbers, one per position;
    its terms are float32 (float32's exp flushes a token more than 87 nats below its block's
    best, whose probability is then below 1e-38, to 0), the sums float64.

    >>> x = torch.tensor([[[0.0, 2.0, -math.inf]]])
    >>> sample, argmax, entropy = fused_draw(x, 1.0, torch.Generator().manual_seed(0))
    >>> argmax.tolist(), sample.tolist()[0][0] in (0, 1), round(float(entropy), 4)
    ([[1]], True, 0.3653)
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
    _fused_rows(x.view(np.int32), float(temperature), uniforms, argmax, sample, entropy)
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
