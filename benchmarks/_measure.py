"""Per-phase measurement: wall time, process CPU, and peak RSS over the phase's start (VmHWM reset)."""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process, in MiB."""
    with open(f"/proc/{pid}/status") as handle:
        text = handle.read()
    out = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(found.group(1)) / 1024 if found else float("nan")
    return out


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def drop_caches() -> bool:
    """Write back and drop the page cache, so the next read comes from disk (needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3")
    except OSError:
        return False
    return True


class Phase:
    """Times a block; records peak RSS over the RSS at its start, and a server process's too."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.marks: dict[str, float] = {}
        self.server_pid = server_pid
        self.server: dict[str, float] = {}

    def __enter__(self) -> Phase:
        gc.collect()
        status = proc_status()
        self.base = status["VmRSS"]
        reset_peak()
        if self.server_pid:
            self._server_rss0 = proc_status(self.server_pid)["VmRSS"]
            self._server_cpu0 = proc_cpu(self.server_pid)
            reset_peak(self.server_pid)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu0 = usage.ru_utime + usage.ru_stime
        self._t0 = self._last = time.perf_counter()
        return self

    def mark(self, name: str) -> None:
        """Record the time since the previous mark (or the start) under ``name``."""
        now = time.perf_counter()
        self.marks[name] = self.marks.get(name, 0.0) + now - self._last
        self._last = now

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = usage.ru_utime + usage.ru_stime - self._cpu0
        self.peak_over_base = proc_status()["VmHWM"] - self.base
        if self.server_pid:
            status = proc_status(self.server_pid)
            self.server = {
                "peak_over_start_mib": status["VmHWM"] - self._server_rss0,
                "cpu_s": proc_cpu(self.server_pid) - self._server_cpu0,
            }

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "base_rss_mib": self.base,
            "peak_over_base_mib": self.peak_over_base,
            "marks": self.marks,
        }
        if self.server:
            out["server"] = self.server
        return out


def print_rounds(times: dict[str, list[float]]) -> None:
    """Each mode's median, minimum and every repetition, a line each (for the in-process A/B scripts)."""
    width = max(map(len, times)) + 1
    for mode, seconds in times.items():
        print(
            f"{mode:{width}s} median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s;  "
            + " ".join(f"{s:.2f}" for s in seconds)
        )


def ab_arguments(doc: str | None, *, cache: bool = False) -> argparse.Namespace:
    """The in-process A/B scripts' shared flags: ``--size-mb``, ``--reps``, ``--dir`` (and ``--cache``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512, help="MiB of fp32 params; the checkpoint is ~3x")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ml_playground_ab"))
    if cache:
        parser.add_argument("--cache", choices=("warm", "cold"), default="warm", help="page cache before each load")
        parser.add_argument("--heap", choices=("trim", "keep"), default="trim", help="allocator's free memory")
    return parser.parse_args()
