"""The vocabulary-sized passes of a denoising step, in torch, on the logits' device.

A step of the canvas DP touches the vocabulary three times: scoring the atoms (one pass
over the logits), writing the constrained log-marginals (the self-conditioning input of
the next step) and choosing a token inside each sampled atom. Everything else, the DP over
the automaton, works on (L, K) atom statistics. On a GPU the logits are (L, V) on the
device: at Gemma's 262,144 tokens and L=256 that is 268 MB, and moving it to the host and
the marginals back costs more than the model's forward. These passes keep the vocabulary
on the device and send only the (L, K) statistics to the CPU, where ``canvas`` runs the DP.

They compute what ``canvas.reduce_atoms``, ``canvas._write_marginals`` and the token step
of ``canvas._sample_tokens`` compute, with one difference that cancels out: statistics are
taken relative to each row's best *allowed* logit (``canvas`` uses the best of all, and
recomputes the rare rows whose allowed tokens underflow), so no row can underflow here.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def atom_index(atom_of: np.ndarray, K: int, device: torch.device) -> torch.Tensor:
    """(V,) int64 on ``device``: each token's atom, K (one past the last) where never allowed."""
    return torch.from_numpy(np.where(atom_of >= 0, atom_of, K).astype(np.int64)).to(device)


def _row_chunks(N: int, V: int) -> list[slice]:
    """Row slices of ~8M elements: the int64 / float64 temporaries of a chunk stay ~64 MB
    at any vocabulary (a whole 256 x 262k canvas would need ~0.5 GB each)."""
    rows = max(1, (1 << 23) // max(V, 1))
    return [slice(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


def reduce_atoms(x: torch.Tensor, idx: torch.Tensor, K: int, want_sum: bool, want_x: bool
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (N, V) float32 on the device -> (rowmax tensor (N,), and as numpy on the host:
    rowmax (N,) f64, asum (N, K) f64, asumx (N, K or 1) f64, amax (N, K) f32, aarg (N, K) i32).

    asum[n, k] = sum over tokens t of atom k of exp(x[n, t] - rowmax[n]); asumx adds the
    factor (x - rowmax) (for entropies); aarg is the lowest token id reaching amax, as the
    compiled scan picks it. Sums are float64, as the host keeps them (an atom may hold
    most of the vocabulary).
    """
    N, V = x.shape
    dev = x.device
    amax = torch.full((N, K + 1), -math.inf, device=dev)  # (N, K + 1), column K: never allowed
    aarg = torch.full((N, K + 1), V, device=dev)  # (N, K + 1) int64
    rowmax = torch.zeros(N, device=dev)  # (N,) best allowed logit of each row
    asum = torch.zeros((N, K + 1) if want_sum else (0, 0), dtype=torch.float64, device=dev)
    asumx = torch.zeros((N, K + 1) if want_x else (0, 0), dtype=torch.float64, device=dev)
    ids = torch.arange(V, device=dev)
    for r in _row_chunks(N, V):
        xr = x[r]  # (n, V)
        cols = idx.expand(xr.shape[0], V)  # (n, V) atom per token
        amax[r] = amax[r].scatter_reduce(1, cols, xr, "amax")
        at_max = (xr == amax[r].gather(1, cols)) & torch.isfinite(xr)  # an all -inf atom has no argmax
        aarg[r] = aarg[r].scatter_reduce(1, cols, torch.where(at_max, ids, V), "amin")
        if K:
            best = amax[r, :K].max(dim=1).values
            rowmax[r] = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        if want_sum:
            shifted = xr - rowmax[r, None]  # (n, V)
            e = shifted.exp()
            asum[r] = asum[r].scatter_add(1, cols, e.double())
            if want_x:
                ex = torch.where(e > 0, e * shifted, 0.0)  # e == 0 at x = -inf, where e * shifted is nan
                asumx[r] = asumx[r].scatter_add(1, cols, ex.double())
    aarg = torch.where(aarg >= V, -1, aarg)  # an atom with no token in this vocabulary
    host = {"amax": amax[:, :K], "aarg": aarg[:, :K].int(), "rowmax": rowmax.double()}
    if want_sum:
        host["asum"] = asum[:, :K]
    if want_x:
        host["asumx"] = asumx[:, :K]
    out = {k: v.cpu().numpy() for k, v in host.items()}
    return (rowmax, out["rowmax"], out.get("asum", np.zeros((N, 1))), out.get("asumx", np.zeros((N, 1))),
            out["amax"], out["aarg"])


def log_marginals(x: torch.Tensor, rowmax: torch.Tensor, F: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """(N, V) constrained log-probs on the device: x - rowmax + log F[atom], -inf where never."""
    N, K = F.shape
    logF_host = np.full((N, K + 1), -np.inf)
    np.log(F, where=F > 0, out=logF_host[:, :K])
    logF = torch.from_numpy(logF_host).to(device=x.device, dtype=torch.float32)  # (N, K + 1), K: never allowed
    out = torch.empty_like(x)  # (N, V)
    for r in _row_chunks(N, x.shape[1]):  # the gathered factors are an (n, V) temporary
        # x - rowmax first: near the row's best logit the difference is exact in float32
        torch.sub(x[r], rowmax[r, None], out=out[r])
        out[r] += logF[r].gather(1, idx.expand(out[r].shape[0], -1))
    return out


def tokens_in_atoms(x: torch.Tensor, rowmax: torch.Tensor, idx: torch.Tensor, atoms: np.ndarray,
                    best: np.ndarray, e_best: np.ndarray, asum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A token inside each position's sampled atom, weight exp(x - rowmax), drawn with the
    uniforms ``u`` (L,) exactly as the compiled scan draws it: the atom's argmax token
    ``best`` first (its share e_best / asum), else the others in token order. Only the
    positions that fall past the argmax token touch the device.
    """
    target = u * asum  # (L,) mass to reach inside the atom
    out = best.astype(np.int64).copy()
    rows = np.nonzero(target >= e_best)[0]
    if rows.size == 0:
        return out
    V = x.shape[1]
    ids = torch.arange(V, device=x.device)
    for chunk in _row_chunks(rows.size, V):
        sel = rows[chunk]
        r = torch.from_numpy(sel).to(x.device)
        k = torch.from_numpy(atoms[sel].astype(np.int64)).to(x.device)  # (R,)
        b = torch.from_numpy(best[sel].astype(np.int64)).to(x.device)  # (R,)
        inside = (idx[None, :] == k[:, None]) & (ids[None, :] != b[:, None])  # (R, V) the atom's other tokens
        w = torch.where(inside, (x[r] - rowmax[r, None]).exp(), 0.0)  # (R, V)
        c = w.cumsum(dim=1, dtype=torch.float64)  # (R, V) running mass, in token order as the host scans
        # (R,) mass past the argmax token; > 0, so the first token reaching it has weight
        rest = torch.from_numpy(np.maximum(target[sel] - e_best[sel], np.finfo(np.float64).tiny))
        pick = torch.searchsorted(c, rest.to(x.device)[:, None]).squeeze(1)  # first token reaching the rest
        last = torch.where(w > 0, ids[None, :], -1).max(dim=1).values  # rounding past the end: the last token
        pick = torch.where(pick >= V, last, pick)
        pick = torch.where(last < 0, b, pick)  # the argmax token holds all the mass
        out[sel] = pick.cpu().numpy()
    return out
