"""On-disk cache of compiled grammars (DFA + token automaton), keyed by content hash.

The key covers the schema(s), options, the wire format file's text and the vocabulary's
fingerprint, so a changed tool, format or tokenizer never hits a stale entry. The folder
is ``$AGENTLOOP_CACHE_DIR`` (default ``~/.cache/agentloop``); ``AGENTLOOP_CACHE_DIR=off``
disables it. Entries are plain ``.npz`` files (no pickle), written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from .fsa import Dfa
from .token_automaton import TokenAutomaton

FORMAT_VERSION = 1


def cache_dir() -> Path | None:
    value = os.environ.get("AGENTLOOP_CACHE_DIR", "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "agentloop"


def _path(key: str) -> Path | None:
    d = cache_dir()
    return None if d is None else d / "grammars" / f"v{FORMAT_VERSION}-{key}.npz"


def load(key: str) -> tuple[Dfa, TokenAutomaton] | None:
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            dfa = Dfa(
                trans=z["dfa.trans"],
                accept=z["dfa.accept"],
                start=int(z["dfa.start"]),
                sym_class=z["dfa.sym_class"],
                class_masks=[int(h, 16) for h in z["dfa.class_masks"].tolist()],
            )
            fields = {f.name: z[f"ta.{f.name}"] for f in dataclasses.fields(TokenAutomaton)}
            for name in ("n_states", "start"):
                fields[name] = int(fields[name])
            return dfa, TokenAutomaton(**fields)
    except (OSError, KeyError, ValueError):
        return None  # a corrupt or foreign file: recompile and overwrite


def save(key: str, dfa: Dfa, automaton: TokenAutomaton) -> None:
    path = _path(key)
    if path is None:
        return
    arrays = {
        "dfa.trans": dfa.trans,
        "dfa.accept": dfa.accept,
        "dfa.start": np.asarray(dfa.start),
        "dfa.sym_class": dfa.sym_class,
        "dfa.class_masks": np.array([format(m, "x") for m in dfa.class_masks]),
    }
    for f in dataclasses.fields(TokenAutomaton):
        arrays[f"ta.{f.name}"] = np.asarray(getattr(automaton, f.name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is not an error: the cache is an optimisation
