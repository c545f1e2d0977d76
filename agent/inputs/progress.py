"""How far a job's inputs are fetched, reported at a bounded rate."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

__all__ = ["FetchProgress"]


class FetchProgress:
    """Each URL input's bytes done of its size, by its path in /input.

    ``report(rows)`` is called by :meth:`start` at once, then by :meth:`update` no more
    often than every ``every_s`` seconds of ``clock``: a fetch moves a MiB at a time, and
    each report is a message to the coordinator.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        *,
        every_s: float,
        clock: Callable[[], float],
        report: Callable[[Mapping[str, tuple[int, int]]], None],
        done: frozenset[str] = frozenset(),
    ) -> None:
        self.rows = {path: (size if path in done else 0, size) for path, size in sizes.items()}
        """Path -> (bytes done, size); the inputs in ``done`` (already cached) are whole."""
        self._every_s = every_s
        self._clock = clock
        self._report = report
        self._reported = -math.inf

    @property
    def totals(self) -> tuple[int, int]:
        """Bytes done and in all, over every input."""
        return sum(d for d, _ in self.rows.values()), sum(t for _, t in self.rows.values())

    def start(self) -> None:
        """Report where the fetch starts from, at once."""
        self._reported = self._clock()
        self._report(self.rows)

    def update(self, path: str, done: int) -> None:
        """Take an input's bytes done so far; report if the last report is old enough."""
        if path not in self.rows:
            return
        self.rows[path] = (min(done, self.rows[path][1]), self.rows[path][1])
        now = self._clock()
        if now - self._reported >= self._every_s:
            self._reported = now
            self._report(self.rows)
