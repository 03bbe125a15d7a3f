"""Progress output: a tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes, files)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Training progress over iterations ``initial..total``; ``line`` prints without breaking the bar."""

    def __init__(self, total: int, initial: int, *, out: TextIO | None = None, bar: bool | None = None) -> None:
        self._out = out or sys.stdout
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar: tqdm | None = (
            tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, leave=False, file=sys.stderr)
            if use_bar
            else None
        )

    def line(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self._out)
        else:
            print(message, file=self._out, flush=True)

    def step(self, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
