"""The CLI's face: flow events (:mod:`ml_playground.flows.events`) as terminal output.

On a terminal a tqdm bar on stderr shows training steps and large copies; lines go to stdout (above
the bar). Elsewhere (CI logs, pipes, files) only the lines are printed.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from ml_playground.flows.events import CheckpointReport, Event, Fetching, Note, Started, Stepped, Transferred

__all__ = ["Renderer", "describe"]

_ANNOUNCE_BYTES = 8 << 20
"""Reads and copies of at least this size are shown (a fetch line, a byte bar)."""


class Renderer:
    """An event sink that draws; ``close()`` (or leaving the ``with`` block) removes any bar."""

    def __init__(self, *, bar: bool | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._bars = self._err.isatty() if bar is None else bar
        self._bar: tqdm | None = None
        self._bar_label: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Note):
            self._line(event.text)
        elif isinstance(event, Started):
            self._open(None, total=event.total, initial=event.initial, unit="it")
        elif isinstance(event, Stepped):
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        elif isinstance(event, Fetching):
            if self._bars and (event.size is None or event.size >= _ANNOUNCE_BYTES):
                size = f" ({event.size / 2**20:.1f} MiB)" if event.size is not None else ""
                print(f"fetching {event.url}{size} ...", file=self._err, flush=True)
        elif isinstance(event, Transferred):
            self._transferred(event)
        elif isinstance(event, CheckpointReport):
            self._line(describe(event))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_label = None, None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._out)
        else:
            print(text, file=self._out, flush=True)

    def _transferred(self, event: Transferred) -> None:
        if event.total < _ANNOUNCE_BYTES:
            return
        if self._bar_label != event.what:
            self._open(event.what, total=event.total, unit="B", unit_scale=True, desc=event.what)
        if self._bar is not None:
            self._bar.update(event.done - self._bar.n)
            if event.done >= event.total:
                self.close()

    def _open(self, label: str | None, **settings: object) -> None:
        self.close()
        if self._bars:
            self._bar = tqdm(dynamic_ncols=True, leave=False, file=self._err, **settings)
            self._bar_label = label


def describe(report: CheckpointReport) -> str:
    """The stdout line of one report."""
    head = f"iter {report.iter_num} {report.kind:<4} {report.name}"
    if report.status == "rotated_away":
        return f"{head}: rotated away before it was read"
    if report.status == "corrupt":
        return f"{head}: CORRUPT ({report.error})"
    saved = "-" if report.metric is None else f"{report.metric:.6f}"
    line = f"{head}: saved metric {saved}, eval loss {report.eval_loss:.6f}"
    return f"{line} (same state as {report.same_state_as})" if report.same_state_as else line
