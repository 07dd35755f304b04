"""Identifiers of runs and requests: unique and unguessable, without a system call per identifier.

`os.urandom` (behind `uuid4` and `secrets`) is a system call, and system calls are what a small call
path pays most for; a keyed BLAKE2b of a per-process counter, under a random key drawn once, gives 128
bits that never repeat within the process and that nobody can predict or relate to each other.
"""

from __future__ import annotations

import hashlib
import itertools
import os

_KEY = os.urandom(32)
_COUNTER = itertools.count()


def _rekey() -> None:
    """A forked child must not repeat its parent's ids: new key, new count."""
    global _KEY, _COUNTER
    _KEY, _COUNTER = os.urandom(32), itertools.count()


os.register_at_fork(after_in_child=_rekey)


def new_id() -> str:
    """32 lowercase hex digits, unique and unpredictable."""
    return hashlib.blake2b(next(_COUNTER).to_bytes(8, "little"), key=_KEY, digest_size=16).hexdigest()
