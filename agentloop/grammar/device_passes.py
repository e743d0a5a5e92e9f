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

What the host prepares for them, per (position, atom) or per position (the references of
the marginals write, the plan of the draw), is compiled, as the canvas passes are: a GPU
step's host lines are its floor (``bench/host_share.py``, device path), and as numpy ops
they were most of what this path added to the host path's lines (Gemma 262k, 1 tool:
1.44 ms against 1.09; compiled, 1.10).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np
import torch


@dataclass(frozen=True)
class AtomLayout:
    """A grammar's token -> atom map on a device, in the two shapes its passes read.

    ``index`` maps each token to its atom (scatters back onto the vocabulary); ``tokens``
    lists each atom's tokens in token order, atom after atom (``offsets``, on the host,
    says where each starts), for drawing a token inside an atom. ``gather`` is the same
    list with each atom's run padded to whole chunks of ``chunk`` tokens (a pad repeats
    the atom's first token and weighs 0): the atom reduction reduces dense (chunk,) rows
    and only the (rows, chunks) partial results meet in a scatter. A scatter straight
    from the vocabulary sends tens of thousands of tokens onto each of a few hundred atoms,
    and on a GPU those atomic updates to one address serialise. The Triton kernels read
    ``tokens`` in *tiles* instead: each atom's run cut into stretches of at most ``tile``
    tokens, one program per row and tile, whose results a second kernel folds per atom
    (and the draw weighs a sampled atom tile by tile).
    """

    index: torch.Tensor  # (V,) int64 atom of each token, K where never allowed
    K: int
    chunk: int  # C tokens per chunk
    gather: torch.Tensor  # (n_chunks * C,) int64 token ids, grouped by atom
    weight: torch.Tensor  # (n_chunks * C,) float32: 1 for a token, 0 for a pad
    chunk_atom: torch.Tensor  # (n_chunks,) int64 the atom of each chunk
    tokens: torch.Tensor  # (n,) int32 the allowed tokens, grouped by atom, in token order
    offsets: np.ndarray  # (K + 1,) int64 where each atom's tokens start in ``tokens``
    tile: int  # tokens per tile (the last of an atom's may be shorter)
    tile_start: torch.Tensor  # (T,) int32 where each tile starts in ``tokens``
    tile_len: torch.Tensor  # (T,) int32 its length, 1..tile
    atom_tiles: torch.Tensor  # (K + 1,) int32 where each atom's tiles start
    max_tiles: int  # the most tiles one atom has


def _chunk_size(sizes: np.ndarray) -> int:
    """The largest chunk (<= 64 tokens) whose padding adds at most a quarter to the
    allowed tokens: at Gemma's 262k tokens and a few hundred atoms that is 64, for a
    small vocabulary split into many atoms it falls towards 1 (a scatter per token)."""
    n = int(sizes.sum())
    for C in (64, 32, 16, 8, 4, 2):
        if int((-(-sizes // C) * C).sum()) * 4 <= n * 5:
            return C
    return 1


def atom_layout(atom_of: np.ndarray, K: int, device: torch.device, chunk: int | None = None,
                tile: int | None = None) -> AtomLayout:
    """``atom_of`` (V,) (-1: never allowed) placed on ``device``; ``chunk`` and ``tile``
    override the chunk size and the tile size (``_TILE``) (tests, benchmarks)."""
    index = np.where(atom_of >= 0, atom_of, K).astype(np.int64)
    allowed = np.flatnonzero(atom_of >= 0)
    order = allowed[np.argsort(atom_of[allowed], kind="stable")]  # (n,) grouped by atom, token order inside
    sizes = np.bincount(atom_of[allowed], minlength=K).astype(np.int64)  # (K,)
    C = chunk or _chunk_size(sizes)
    padded = -(-sizes // C) * C  # (K,) each atom's run, whole chunks
    slot_atom = np.repeat(np.arange(K), padded)  # (n_chunks * C,)
    offset = np.arange(padded.sum()) - np.repeat(np.cumsum(padded) - padded, padded)  # place in its atom's run
    first = np.cumsum(sizes) - sizes  # (K,) where each atom starts in ``order``
    real = offset < sizes[slot_atom]
    gather = order[np.where(real, first[slot_atom] + offset, first[slot_atom])] if order.size else order
    tile = tile or _TILE
    n_tiles = -(-sizes // tile)  # (K,)
    tile_atom = np.repeat(np.arange(K), n_tiles)  # (T,)
    tile_start = first[tile_atom] + (np.arange(tile_atom.size) - np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)) * tile
    tile_len = np.minimum(tile, first[tile_atom] + sizes[tile_atom] - tile_start)
    return AtomLayout(
        index=torch.from_numpy(index).to(device), K=K, chunk=C,
        gather=torch.from_numpy(gather.astype(np.int64)).to(device),
        weight=torch.from_numpy(real.astype(np.float32)).to(device),
        chunk_atom=torch.from_numpy(np.repeat(np.arange(K), padded // C).astype(np.int64)).to(device),
        tokens=torch.from_numpy(order.astype(np.int32)).to(device), offsets=np.concatenate([first, [order.size]]),
        tile=tile, tile_start=torch.from_numpy(tile_start.astype(np.int32)).to(device),
        tile_len=torch.from_numpy(tile_len.astype(np.int32)).to(device),
        atom_tiles=torch.from_numpy(np.concatenate([[0], np.cumsum(n_tiles)]).astype(np.int32)).to(device),
        max_tiles=int(n_tiles.max()) if K else 0)


#: Tokens per tile of the Triton atom reduction (``tile_stats``): a Gemma-sized atom of
#: ~250k tokens becomes ~60 programs per row, each reading 16 KB of logits twice (the
#: second time from L2).
_TILE = 4096


def _row_chunks(N: int, V: int, device: torch.device | None = None) -> list[slice]:
    """Row slices of ~8M elements (64M on a CUDA device): the temporaries of a slice stay
    ~32-64 MB in host memory at any vocabulary, and on a GPU a 256 x 262k canvas goes in
    one slice (~0.3 GB per temporary), not eight rounds of a dozen small kernels. At most
    ``_GRID_ROWS`` rows."""
    rows = min(_GRID_ROWS, max(1, (1 << (26 if device is not None and device.type == "cuda" else 23)) // max(V, 1)))
    return [slice(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


#: Rows per launch of a kernel whose grid runs along the rows on its second axis, which
#: ends at 65,535 blocks.
_GRID_ROWS = 1 << 15


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to copy to or from ``device``: page-locked where that is a CUDA
    device, plain memory elsewhere. A copy from or to pageable memory goes through the
    driver's own page-locked buffer: a second copy on the host, the host waiting for it,
    at about half the bandwidth. torch's caching host allocator hands page-locked blocks
    back out, and keeps a block from reuse until the copies enqueued on it are done, so one
    of these a step costs a lookup; a copy must be made from this tensor itself for that
    (not from a numpy view of it)."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def to_host(t: torch.Tensor) -> np.ndarray:
    """``t`` on the host as numpy, copied through page-locked memory from a CUDA device
    (``host_tensor``) and waited for; a CPU tensor's own memory."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    host = host_tensor(tuple(t.shape), t.dtype, t.device)
    host.copy_(t)
    return host.numpy()


def reduce_atoms(x: torch.Tensor, layout: AtomLayout, want_sum: bool, want_x: bool, kernel: str = "auto"
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (N, V) float32 on the device -> (rowmax tensor (N,), and as numpy on the host:
    rowmax (N,) f64, asum (N, K) f64, asumx (N, K or 1) f64, amax (N, K) f32, aarg (N, K) i32).

    asum[n, k] = sum over tokens t of atom k of exp(x[n, t] - rowmax[n]); asumx adds the
    factor (x - rowmax) (for entropies); aarg is the lowest token id reaching amax, as the
    compiled scan picks it. Each stretch of an atom's tokens is reduced first, its sums
    taken from its own best logit m; those are rescaled by exp(m - rowmax) and added up per
    atom in float64, as the host keeps them (an atom may hold most of the vocabulary).
    ``kernel``: "triton" reads the logits once, in tiles of up to ``_TILE`` of an atom's
    tokens (float64 sums), and folds the tiles per atom in a second kernel; "torch" takes a
    dozen torch ops over chunks of at most 64 tokens (float32 sums); "auto" takes triton on
    a CUDA device where it is installed (it comes with CUDA builds of torch). The
    x-weighted sums come only with the sums (``want_x`` needs ``want_sum``).
    """
    want_x = want_x and want_sum
    if _use_kernel(kernel, x.device, "tile_stats"):
        return _kernel_or_torch("tile_stats", lambda: _reduce_atoms_triton(x, layout, want_sum, want_x),
                                lambda: _reduce_atoms_torch(x, layout, want_sum, want_x), strict=kernel == "triton")
    return _reduce_atoms_torch(x, layout, want_sum, want_x)


def _reduce_atoms_triton(x: torch.Tensor, layout: AtomLayout, want_sum: bool, want_x: bool
                         ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``reduce_atoms`` in two Triton kernels (per row and tile, then per row and atom)
    and one copy to the host."""
    N, V = x.shape
    K, T = layout.K, layout.tile_start.shape[0]
    dev = x.device
    x = x if x.stride(1) == 1 else x.contiguous()
    m = torch.empty((N, T), device=dev)  # (N, T) float32 each tile's best logit
    first = torch.empty((N, T), dtype=torch.int32, device=dev)  # (N, T) its lowest token
    s = torch.empty((N, T) if want_sum else (0,), dtype=torch.float64, device=dev)  # (N, T) its sums
    sx = torch.empty((N, T) if want_x else (0,), dtype=torch.float64, device=dev)
    rowmax = torch.empty(N, device=dev)  # (N,) (combine_tiles writes every row's)
    # what goes to the host, in one buffer for one copy: rowmax (N,) and the sums' (N, K)
    # planes in float64, then amax (N, K) float32 and aarg (N, K) int32, which share the
    # last 8 bytes a (row, atom) (so float64's alignment holds throughout)
    n64 = N + (want_sum + want_x) * N * K
    out = torch.empty(n64 + N * K, dtype=torch.float64, device=dev)
    tail = out[n64:].view(torch.int32)  # (2 * N * K,)
    if N and T:
        for r0 in range(0, N, _GRID_ROWS):
            r = slice(r0, min(N, r0 + _GRID_ROWS))
            _kernels().tile_stats[(T, r.stop - r.start)](
                _rows(x, r), x.stride(0), layout.tokens, layout.tile_start, layout.tile_len, _rows(m, r),
                _rows(first, r), _rows(s, r) if want_sum else s, _rows(sx, r) if want_x else sx, T, V,
                BLOCK=_TILE_BLOCK, WANT_SUM=want_sum, WANT_X=want_x)
    if N:
        _kernels().combine_tiles[(N,)](m, first, s, sx, layout.atom_tiles, rowmax, out, tail[:N * K].view(torch.float32),
                                       tail[N * K:], N, T, K, layout.max_tiles, V, BLOCK_K=_triton_block(K),
                                       WANT_SUM=want_sum, WANT_X=want_x)
    host = to_host(out)
    plane = [host[N + i * N * K: N + (i + 1) * N * K].reshape(N, K) for i in range(want_sum + want_x)]
    host_tail = host[n64:].view(np.int32)
    return (rowmax, host[:N], plane[0] if want_sum else np.zeros((N, 1)), plane[1] if want_x else np.zeros((N, 1)),
            host_tail[:N * K].view(np.float32).reshape(N, K), host_tail[N * K:].reshape(N, K))


def _rows(t: torch.Tensor, r: slice) -> torch.Tensor:
    """Rows ``r`` of ``t``: ``t`` itself where they are all of its rows, as for a step's
    canvas on a GPU (a slice costs ~1.5 us of Python, and a step made ten of them)."""
    return t if r.start == 0 and r.stop >= t.shape[0] else t[r]


#: Lanes of the ``tile_stats`` kernel (tokens read at once).
_TILE_BLOCK = 1024


def _triton_block(n: int) -> int:
    """The power of two at or above ``n`` (at least 16): a Triton block holding n lanes."""
    return max(16, 1 << max(0, n - 1).bit_length())


def _reduce_atoms_torch(x: torch.Tensor, layout: AtomLayout, want_sum: bool, want_x: bool
                        ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``reduce_atoms`` in torch ops: per chunk of ``layout.gather``, then scattered per atom."""
    N, V = x.shape
    K = layout.K
    n_chunks = layout.chunk_atom.shape[0]
    dev = x.device
    amax = torch.full((N, K), -math.inf, device=dev)  # (N, K)
    aarg = torch.full((N, K), V, device=dev)  # (N, K) int64, V: no finite logit
    rowmax = torch.zeros(N, device=dev)  # (N,) best allowed logit of each row
    asum = torch.zeros((N, K) if want_sum else (0, 0), dtype=torch.float64, device=dev)
    asumx = torch.zeros((N, K) if want_x else (0, 0), dtype=torch.float64, device=dev)
    for r in _row_chunks(N, n_chunks * layout.chunk, dev):
        m, first, s, sx = _chunk_stats(x[r], layout, want_sum, want_x)
        atom = layout.chunk_atom.expand(m.shape[0], n_chunks)  # (n, n_chunks)
        amax[r] = amax[r].scatter_reduce(1, atom, m, "amax")
        top = m == amax[r].gather(1, atom)  # (n, n_chunks) chunks holding their atom's best
        aarg[r] = aarg[r].scatter_reduce(1, atom, torch.where(top, first, V), "amin")
        if K:
            best = amax[r].max(dim=1).values
            rowmax[r] = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        if want_sum:
            m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # the chunk sums' reference
            lift = m0.double() - rowmax[r, None].double()  # (n, n_chunks) chunk reference -> row reference
            scale = torch.where(m == -math.inf, 0.0, lift.exp())  # an all -inf chunk adds nothing
            asum[r] = asum[r].scatter_add(1, atom, s.double() * scale)
            if want_x:  # sum of e * (x - rowmax) = sum of e * (x - m) + (m - rowmax) * sum of e
                asumx[r] = asumx[r].scatter_add(1, atom, (sx.double() + s.double() * lift) * scale)
    aarg = torch.where(aarg >= V, -1, aarg)  # an atom with no finite logit (or no token in this vocabulary)
    host = {"amax": amax, "aarg": aarg.int(), "rowmax": rowmax.double()}
    if want_sum:
        host["asum"] = asum
    if want_x:
        host["asumx"] = asumx
    out = {k: to_host(v) for k, v in host.items()}
    return (rowmax, out["rowmax"], out.get("asum", np.zeros((N, 1))), out.get("asumx", np.zeros((N, 1))),
            out["amax"], out["aarg"])


def _chunk_stats(x: torch.Tensor, layout: AtomLayout, want_sum: bool, want_x: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, V) -> per (row, chunk): best logit m, lowest token reaching it (V where the
    chunk has no finite logit), sum of e = exp(x - m) and of e * (x - m) (an all -inf chunk
    takes m = 0 as the sums' reference, and sums 0)."""
    n_chunks, C = layout.chunk_atom.shape[0], layout.chunk
    token = layout.gather.view(n_chunks, C)  # (n_chunks, C)
    xr = x.index_select(1, layout.gather).view(-1, n_chunks, C)  # (n, n_chunks, C) grouped by atom
    # inside a chunk tokens rise in id and the pads (last) repeat a token of the atom's
    # first chunk, so max's first place holds the chunk's lowest token reaching its best
    m, at = xr.max(dim=2)  # (n, n_chunks)
    chunk_ids = torch.arange(n_chunks, device=x.device)  # (n_chunks,)
    first = torch.where(torch.isfinite(m), token[chunk_ids, at], x.shape[1])  # (n, n_chunks)
    if not want_sum:
        return m, first, m, m
    m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (n, n_chunks)
    shifted = (xr - m0[..., None]).clamp_(min=-1e30)  # (n, n_chunks, C) <= 0; floored: e * shifted is 0 at -inf
    e = shifted.exp().mul_(layout.weight.view(n_chunks, C))  # pads weigh 0
    s = e.sum(dim=2)  # (n, n_chunks)
    sx = e.mul_(shifted).sum(dim=2) if want_x else s
    return m, first, s, sx


def _use_kernel(kernel: str, device: torch.device, name: str) -> bool:
    """Whether a pass takes its Triton kernel (``fused_kernel.<name>``): asked for by name
    ("triton"), or, for "auto", on a CUDA device where triton is installed (it comes with
    CUDA builds of torch) and that kernel has not failed in this process; "torch" never."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', not {kernel!r}")
    return kernel == "triton" or (kernel == "auto" and device.type == "cuda" and _triton_available(name))


def _kernel_or_torch(name: str, run_kernel: Callable[[], Any], run_torch: Callable[[], Any], strict: bool) -> Any:
    """A pass from its Triton kernel ``name``. Where the kernel was only preferred ("auto",
    not ``strict``) and fails to build or run, the pass goes on in torch and that kernel is
    not tried again in this process (with a warning that says why); the others are."""
    try:
        return run_kernel()
    except Exception as e:  # noqa: BLE001 - any failure of an optional fast path
        if strict:
            raise
        _kernel_failed[name] = f"{type(e).__name__}: {e}"
        warnings.warn(f"agentloop: the fused Triton kernel {name} of the grammar's vocabulary passes failed "
                      f"({_kernel_failed[name][:300]}); using torch ops instead", RuntimeWarning, stacklevel=4)
    return run_torch()


#: Why each fused kernel that failed in this process failed (then "auto" stops trying it).
_kernel_failed: dict[str, str] = {}


def _triton_available(name: str = "") -> bool:
    """Whether triton is installed and the kernel ``name`` (with no name: every kernel)
    has not failed in this process."""
    return _kernels() is not None and (name not in _kernel_failed if name else not _kernel_failed)


@functools.cache
def _kernels() -> Any:
    """The module of Triton kernels (``fused_kernel``), or None without triton. Imported on
    first use: the CPU never needs triton."""
    try:
        from . import fused_kernel
    except ImportError:
        return None
    return fused_kernel


def log_marginals(x: torch.Tensor, refs: np.ndarray | torch.Tensor, idx: torch.Tensor,
                  out: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """(N, V) constrained log-probs on the device: x - ref[atom] + shift[atom] in float32
    (``refs`` (2, N, K + 1) float32 on the host, ref then shift per atom: see
    :func:`atom_references`; a ``host_tensor`` is copied without the host waiting), -inf
    where never; written into ``out`` (N, V) when given. ``kernel`` as for
    :func:`reduce_atoms`: the Triton kernel reads x once and writes ``out`` once; the torch
    ops take a few passes and (N, V) temporaries."""
    # (2, N, K + 1): one copy to the device, which the passes below follow on its stream
    both = torch.as_tensor(refs).to(device=x.device, non_blocking=True)
    ref_dev, shift_dev = both[0], both[1]
    if out is None:
        out = torch.empty(x.shape, device=x.device)  # (N, V)
    # (the kernel writes rows of contiguous tokens)
    if _use_kernel(kernel, x.device, "log_marginals") and out.stride(1) == 1:
        return _kernel_or_torch("log_marginals", lambda: _log_marginals_triton(x, ref_dev, shift_dev, idx, out),
                                lambda: _log_marginals_torch(x, ref_dev, shift_dev, idx, out),
                                strict=kernel == "triton")
    return _log_marginals_torch(x, ref_dev, shift_dev, idx, out)


def atom_references(log_f: np.ndarray, amax: np.ndarray, rowmax: np.ndarray, frame: np.ndarray | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Per atom of each row, the reference ``ref`` and the ``shift`` that
    :func:`log_marginals` writes x - ref + shift with, in float32, packed as one (2, N,
    K + 1) float32 array (ref, then shift) for one copy to the device: the atom's best
    logit, and its best token's log-marginal, log F + (amax - rowmax) (taken in float64,
    rounded once). Both terms stay small near every token that carries mass, whatever the
    spread of the logits: from one reference a row, a token 1e10 below it (a -1e10 mask
    the grammar forces a canvas through) lost its e^-10 to float32's resolution there
    (1024). An atom with no mass or no usable logit, and column K (the tokens never
    allowed): ref 0, shift -inf. ``frame`` (N, K), where given, stands for amax - rowmax:
    the factors of a canvas whose masks stood in (see ``masks``) are taken from each
    atom's stand-in less its row's reference. One compiled pass (numpy's wheres and
    temporaries, and the packing, took ~0.2 ms a step at Gemma's 262k, 1 tool). Written
    into ``out`` where given (a (2, N, K + 1) float32 C-contiguous array: a numpy view of
    a ``host_tensor``, say)."""
    N, K = log_f.shape
    if out is not None and not (out.shape == (2, N, K + 1) and out.dtype == np.float32
                                and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"atom_references: out must be a writeable C-contiguous float32 array of shape "
                         f"{(2, N, K + 1)}, not {out.dtype} {out.shape}")
    refs = np.empty((2, N, K + 1), np.float32) if out is None else out
    if frame is None:
        _references_into(log_f, amax, rowmax, refs)
    else:
        _framed_references_into(log_f, amax, frame, refs)
    return refs


def _references_kernel(framed: bool):  # type: ignore[no-untyped-def]
    """``atom_references``' pass, with the gaps amax - rowmax or those of a frame (a
    compile-time flag: with the choice made inside the loop it did not vectorise, 13x
    slower)."""

    @nb.njit(cache=True, nogil=True)
    def references_into(log_f, amax, rowmax_or_frame, refs):  # pragma: no cover - compiled
        N, K = log_f.shape
        for n in range(N):
            ref, shift, lf_n, a_n = refs[0, n], refs[1, n], log_f[n], amax[n]
            m = 0.0 if framed else rowmax_or_frame[n]
            for k in range(K):
                a = a_n[k]
                lf = lf_n[k]
                gap = rowmax_or_frame[n, k] if framed else np.float64(a) - m
                usable = (lf > -np.inf) & (a > -np.inf)  # (a nan log F is not usable either)
                ref[k] = a if usable else np.float32(0.0)
                shift[k] = np.float32(lf + gap) if usable else np.float32(-np.inf)
            ref[K] = 0.0
            shift[K] = -np.inf

    return references_into


_references_into = _references_kernel(False)
_framed_references_into = _references_kernel(True)


def _log_marginals_torch(x: torch.Tensor, ref: torch.Tensor, shift: torch.Tensor, idx: torch.Tensor,
                         out: torch.Tensor) -> torch.Tensor:
    K = shift.shape[1] - 1
    for r in _row_chunks(x.shape[0], x.shape[1], x.device):  # the gathered columns are (n, V) temporaries
        n = r.stop - r.start
        # x - the atom's best logit first: near it the difference is exact in float32
        torch.sub(x[r], ref[r].gather(1, idx.expand(n, -1)), out=out[r])
        out[r] += shift[r].gather(1, idx.expand(n, -1))
        out[r].masked_fill_(idx == K, -math.inf)  # never allowed: -inf even where the logit is nan
    return out


#: Tokens per program of the marginals kernel.
_MARGINALS_BLOCK = 1024


def _log_marginals_triton(x: torch.Tensor, ref: torch.Tensor, shift: torch.Tensor, idx: torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor:
    N, V = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    for r in _row_chunks(N, V, x.device):  # (at most 32,768 rows: a grid's second axis ends at 65,535)
        n = r.stop - r.start
        if n and V:
            _kernels().log_marginals[(-(-V // _MARGINALS_BLOCK), n)](
                _rows(x, r), x.stride(0), _rows(ref, r).contiguous(), _rows(shift, r).contiguous(), idx,
                _rows(out, r), out.stride(0), V, shift.shape[1] - 1, BLOCK=_MARGINALS_BLOCK)
    return out


def tokens_in_atoms(x: torch.Tensor, layout: AtomLayout, atoms: np.ndarray, best: np.ndarray,
                    best_logit: np.ndarray, rowmax: np.ndarray, asum: np.ndarray, u: np.ndarray,
                    kernel: str = "auto") -> np.ndarray:
    """A token inside each position's sampled atom, drawn with the uniforms ``u`` (L,) as
    the compiled scan draws it: weights exp(x - best_logit), taken from the atom's best
    logit (L,), so its best token ``best`` weighs 1 and its total is asum (L,), which is
    taken from the row's best ``rowmax`` (L,), over exp(best_logit - rowmax); the best
    token first (its share 1 / total), else the others in token order. From the atom's own best, an atom far below the row's
    best (a forced digit where the model wants a letter, at a low temperature) keeps its
    tokens' weights, which float32 flushes to 0 beyond 87 nats. Only the positions that
    fall past the best token touch the device, and only their atoms' tokens are read
    (``layout.tokens``), not the whole vocabulary. ``kernel`` as for :func:`reduce_atoms`:
    the Triton kernels weigh each position's atom tile by tile, all tiles at once, then
    walk from the tile holding the token, block by block, and stop at the block holding
    it; the torch ops weigh every token of the largest sampled atom at every such position.
    """
    # (one type and layout each: one compiled plan, whatever dtypes the caller holds)
    arrays = ((best, np.int64), (best_logit, np.float32), (rowmax, np.float64), (asum, np.float64), (u, np.float64),
              (atoms, np.int64))
    out, plan = _draw_plan(*(np.ascontiguousarray(a, dtype) for a, dtype in arrays), layout.offsets)
    if plan.shape[1] == 0:
        return out
    rows = plan[0]
    if _use_kernel(kernel, x.device, "draw_in_atoms"):
        out[rows] = _kernel_or_torch("draw_in_atoms", lambda: _draw_triton(x, layout, plan),
                                     lambda: _draw_torch(x, layout, plan), strict=kernel == "triton")
    else:
        out[rows] = _draw_torch(x, layout, plan)
    return out


@nb.njit(cache=True, nogil=True)
def _draw_plan(best, best_logit, rowmax, asum, u, atoms, offsets):  # pragma: no cover - compiled
    """The host's part of ``tokens_in_atoms``, in one compiled call (numpy's dozen small
    ops took ~0.1 ms a step): each position's best token (int64 (L,)), and for the R
    positions whose uniform falls past it the draw's arguments, packed as one (6, R) int64
    array for one copy to the device: rows, where each atom starts in ``offsets``' list,
    its size, its best token; then, as float64 (rows 4 and 5 viewed so:
    ``plan_floats``), the mass to reach past the best token, and the best logit (a
    float32's value), the weights' reference."""
    L = best.shape[0]
    out = best.astype(np.int64)
    past = np.empty(L, np.int64)  # the positions drawn past their best token ...
    rest = np.empty(L, np.float64)  # ... and the mass to reach there
    R = 0
    for l in range(L):
        # (an atom too far below its row's best for float64, exp underflowing, is drawn
        # only with probability under 2**-57, where pruning left such atoms out: as its
        # best token)
        e_best = math.exp(np.float64(best_logit[l]) - rowmax[l])
        mass = asum[l] / e_best if e_best > 0.0 else 1.0  # the atom's total, its best token weighing 1
        target = u[l] * mass
        if target >= 1.0:
            past[R] = l
            rest[R] = max(target - 1.0, _TINY)  # > 0: the first token reaching it has weight
            R += 1
    plan = np.empty((6, R), np.int64)
    floats = plan[4:].view(np.float64)  # (2, R)
    for i in range(R):
        l = past[i]
        a = atoms[l]
        plan[0, i] = l
        plan[1, i] = offsets[a]
        plan[2, i] = offsets[a + 1] - offsets[a]  # > 0: a sampled atom has tokens
        plan[3, i] = best[l]
        floats[0, i] = rest[i]
        floats[1, i] = best_logit[l]
    return out, plan


def plan_floats(plan: Any) -> Any:
    """The float64 rows of a draw's plan (``_draw_plan``), numpy or torch: (2, R), the
    mass to reach past each best token and the weights' reference."""
    return plan[4:].view(np.float64 if isinstance(plan, np.ndarray) else torch.float64)


_TINY = float(np.finfo(np.float64).tiny)


def _draw_torch(x: torch.Tensor, layout: AtomLayout, plan: np.ndarray) -> np.ndarray:
    rows, start, size, best = plan[:4]  # (R,) each (see _draw_plan)
    rest, ref = plan_floats(plan)
    ref = ref.astype(np.float32)
    dev = x.device
    out = np.empty(rows.size, np.int64)
    width = int(size.max())
    place = torch.arange(width, device=dev)  # (W,)
    for chunk in _row_chunks(rows.size, width, dev):
        r = torch.from_numpy(rows[chunk]).to(dev)  # (R,)
        m = torch.from_numpy(ref[chunk]).to(dev)  # (R,) float32 the weights' reference
        b = torch.from_numpy(best[chunk]).to(dev)  # (R,)
        n = torch.from_numpy(size[chunk]).to(dev)  # (R,)
        at = (torch.from_numpy(start[chunk]).to(dev)[:, None] + place).clamp_(max=layout.tokens.shape[0] - 1)
        ids = layout.tokens[at]  # (R, W) the atom's tokens in token order, then filler past its size
        inside = (place[None, :] < n[:, None]) & (ids != b[:, None])  # the atom's other tokens
        w = torch.where(inside, (x[r[:, None], ids] - m[:, None]).exp(), 0.0)  # (R, W)
        c = w.cumsum(dim=1, dtype=torch.float64)  # (R, W) running mass, in token order as the host scans
        pick = torch.searchsorted(c, torch.from_numpy(rest[chunk]).to(dev)[:, None])  # (R, 1) first place reaching it
        last = torch.where(w > 0, place[None, :], -1).max(dim=1).values  # rounding past the end: the last token
        pick = torch.where(pick[:, 0] >= width, last, pick[:, 0])
        token = ids.gather(1, pick.clamp(min=0)[:, None])[:, 0]
        token = torch.where(last < 0, b, token)  # the best token holds all the mass
        out[chunk] = to_host(token)
    return out


#: Tokens per step of the draw kernel's walk through an atom.
_DRAW_BLOCK = 1024


def _draw_triton(x: torch.Tensor, layout: AtomLayout, plan_host: np.ndarray) -> np.ndarray:
    dev = x.device
    x = x if x.stride(1) == 1 else x.contiguous()
    size = plan_host[2]
    R = size.shape[0]
    cols = torch.from_numpy(plan_host).to(dev)  # (6, R) int64: one copy to the device
    floats = plan_floats(cols)  # (2, R) float64 (ref: a float32's value)
    out = torch.empty(R, dtype=torch.int64, device=dev)
    # first the mass of each tile of each position's atom (all in parallel), so that the
    # walk starts at the tile holding the token: a Gemma-sized atom is ~60 tiles, which a
    # single walk took one after another
    n_mass = int(-(-size.max() // layout.tile))
    mass = torch.empty((R, n_mass), dtype=torch.float64, device=dev)  # (R, tiles)
    _kernels().tile_masses[(R, n_mass)](
        x, x.stride(0), floats[1], layout.tokens, cols[0], cols[1], cols[2], cols[3], mass, n_mass,
        TILE=layout.tile, BLOCK=min(_TILE_BLOCK, _triton_block(layout.tile)))
    _kernels().draw_in_atoms[(R,)](
        x, x.stride(0), floats[1], layout.tokens, cols[0], cols[1], cols[2], cols[3], floats[0], mass, n_mass, out,
        TILE=layout.tile, BLOCK_T=_triton_block(n_mass), BLOCK=_DRAW_BLOCK)
    return to_host(out)
