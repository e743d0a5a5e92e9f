"""Imported by the A/B scripts before either version of ``agentloop``: numba's on-disk
cache pointed at an empty folder, so that both versions compile their kernels in the
A/B's own process.

The baseline, exported afresh into a temporary folder, always compiled there, while the
working tree's kernels loaded from numba's cache. The two are the same machine code (the
cache keeps what the JIT produced), but they run at different speeds: the scan with sums
at 262k took 68 ms compiled in the process and 85 ms loaded from the cache (30k: 11.0
against 12.2 ms; 4k alike), the same code in both places. A self-A/B (``--baseline
HEAD``, no change) read the working tree 1.16-1.25x slower at 262k, so A/Bs at large
vocabularies before this module leaned against the working tree. With both compiled here
the same self-A/B reads 1.0.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import numba

_FOLDER = tempfile.mkdtemp(prefix="agentloop-ab-numba-")
atexit.register(shutil.rmtree, _FOLDER, True)
numba.config.CACHE_DIR = _FOLDER  # read when each cached kernel is defined, so: before importing agentloop
