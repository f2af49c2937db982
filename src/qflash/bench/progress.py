"""A progress bar on stderr: tqdm when installed, else a plain ``[i/n] label`` counter."""

from __future__ import annotations

import sys


class Progress:
    """``with Progress(total, desc) as p: p.step("label")`` — never writes to stdout."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.i = total, desc, enabled, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def set(self, label: str) -> None:
        """Show what is running now."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        else:
            print(f"{self.desc} [{self.i + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def step(self) -> None:
        self.i += 1
        if self._bar is not None:
            self._bar.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
