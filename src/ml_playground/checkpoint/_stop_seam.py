"""A test seam: stop this process at a chosen stage of a save, so a fault test can SIGKILL ranks right there.

``ML_PLAYGROUND_TEST_STOP_AT=<stage>:<rank>:<n>`` (fault tests only; unset, each stage costs one environment
lookup): the ``n``-th time (from 1) rank ``<rank>`` (torchrun's ``RANK``; 0 without torchrun) reaches
``<stage>``, the process sends itself SIGSTOP. The test sees it stopped (state ``T`` in ``/proc/<pid>/stat``),
SIGKILLs the ranks it chose and resumes (SIGCONT) the others (docs/reliability.md, "Sharded checkpoints").

Stages of a sharded save:

- ``parts``: this rank's ``.model`` part committed, its ``.optim`` part being written (not committed);
- ``gathered``: every rank's parts committed and their digests gathered on the coordinator, before the manifest;
- ``manifest``: the manifest's bytes written, not yet committed;
- ``rotation``: rotation deleted an older checkpoint's manifest (or single file), not yet its parts.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

from ml_playground.errors import ConfigError

__all__ = ["STAGES", "STOP_AT_VARIABLE", "reached"]

STOP_AT_VARIABLE = "ML_PLAYGROUND_TEST_STOP_AT"
STAGES = ("parts", "gathered", "manifest", "rotation")

_counts: Counter[str] = Counter()
_lock = threading.Lock()  # an async save reaches its stages in DCP's background thread


def reached(stage: str) -> None:
    """This process is at ``stage``: stop here if the seam asks for it (a no-op when the variable is unset)."""
    wanted = os.environ.get(STOP_AT_VARIABLE)
    if not wanted:
        return
    fields = wanted.split(":")
    if len(fields) != 3 or fields[0] not in STAGES or not fields[1].isdigit() or not fields[2].isdigit():
        raise ConfigError(f"{STOP_AT_VARIABLE}={wanted!r}: expected <stage>:<rank>:<n>, a stage one of {STAGES}")
    name, rank, nth = fields[0], int(fields[1]), int(fields[2])
    if name != stage or int(os.environ.get("RANK", "0")) != rank:
        return
    with _lock:
        _counts[stage] += 1
        stop = _counts[stage] == nth
    if stop:
        # Sent to this thread, not the process: the kernel may hand a process-directed SIGSTOP to another
        # thread, and this one (an async save's) would run on past the stage until the whole group stops.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
