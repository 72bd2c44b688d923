"""How many threads a decode step runs on: all of them, or one when they wait on each other.

A decode step is ~150 short parallel kernels, each ending in a barrier where every thread
waits for the slowest. When other processes hold the cores, a thread is often descheduled
and the barrier waits out the scheduler's slice: measured on 2 cores beside one busy loop,
the int8 step ran at 0.27 of its idle speed on 2 threads and at 0.65 on 1 (llama.cpp: 0.29).
The outputs are the same either way: every kernel computes each output element on one
thread, so the split changes which thread works, not the sums.

``ThreadPlanner`` times each step and moves to one thread only when all of them have slowed
down and one thread proves faster, trying all threads again now and then.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PROBE_EVERY = 32
"""Steps between two trials of the other thread count while one is chosen over the other."""
SLOWDOWN = 1.5
"""All threads are suspected to wait on each other once their steps take this many times
the fastest step seen."""
SMOOTHING = 0.5
"""Weight of the newest step in a count's running mean of step time."""


class ThreadPlanner:
    """Chooses the thread count of each decode step from measured step times.

    On all threads while their steps run at the speed seen before: no trials, no cost. Once
    they slow down (``SLOWDOWN``), one step tries a single thread, and the faster of the two
    runs from then on; while one thread wins, all threads are tried again every
    ``PROBE_EVERY`` steps. A trial's time replaces that count's mean (the machine may have
    changed since it last ran).

    Args:
        threads: the most threads to use (torch's setting when the loop starts).
    """

    def __init__(self, threads: int) -> None:
        self.all = threads
        self.mean_s: dict[int, float] = {}
        self.fastest_s = float("inf")
        self.steps = 0
        self.last = threads

    def next_threads(self) -> int:
        """The thread count of the next step."""
        if self.all == 1 or self.all not in self.mean_s:
            return self.all
        one_wins = 1 in self.mean_s and self.mean_s[1] < self.mean_s[self.all]
        trial_due = self.steps % PROBE_EVERY == 0
        if one_wins:
            return self.all if trial_due else 1
        slowed = self.mean_s[self.all] > SLOWDOWN * self.fastest_s
        return 1 if slowed and (1 not in self.mean_s or trial_due) else self.all

    def record(self, threads: int, seconds: float) -> None:
        """Count a step of ``seconds`` run on ``threads``."""
        previous = self.mean_s.get(threads)
        if previous is None or threads != self.last:
            self.mean_s[threads] = seconds
        else:
            self.mean_s[threads] = SMOOTHING * seconds + (1 - SMOOTHING) * previous
        if threads == self.all:
            self.fastest_s = min(self.fastest_s, seconds)
        self.last = threads
        self.steps += 1

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        """Run the block (one decode step) on the chosen thread count, timed; torch's
        setting is restored after."""
        threads = self.next_threads()
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield threads
        finally:
            self.record(threads, time.perf_counter() - started)
            if threads != before:
                torch.set_num_threads(before)


__all__ = ["PROBE_EVERY", "SLOWDOWN", "ThreadPlanner"]
