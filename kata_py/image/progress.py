"""Build progress: a rich spinner on a terminal, short plain lines otherwise.

Builds run from the CLI (a person watching) and from VM starts inside
monitors and tests (logs), so the display degrades to one line per step.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Reporter:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._console = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                self._console = Console(stderr=True)
            except ImportError:
                self._console = None

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(f"  [dim]{text}[/dim]")
        else:
            print(f"kata-py image: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, key: str, text: str) -> Iterator[None]:
        start = time.monotonic()
        if self.enabled and self._console is not None:
            with self._console.status(f"{text}..."):
                yield
            took = time.monotonic() - start
            self._console.print(f"[green]✓[/green] {text} [dim]({took:.1f}s)[/dim]")
        else:
            if self.enabled:
                print(f"kata-py image: {text}...", file=sys.stderr, flush=True)
            yield
            took = time.monotonic() - start
        self.timings[key] = round(took, 3)
