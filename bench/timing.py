"""Timing steps side by side: each is warmed up first, then every repeat times each in turn (the
order rotating), so that a slow spell of a shared machine hits all of them; callers report the
median over repeats."""

from __future__ import annotations

import math
import time
from typing import Callable

# A repeat runs a step this many seconds or longer: as many calls as that takes, or one.
MIN_REPEAT_SECONDS = 1.0
# Pause before each timed repeat: both frameworks keep worker threads spinning for a while after a
# step (XLA's thread pool, torch's OpenMP team), and on a small CPU those spinning threads slow the
# next framework's step, torch's most. Not counted.
SETTLE_SECONDS = 0.5


def _time_repeat(step: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def _calls_per_repeat(step: Callable[[], None], min_repeat_seconds: float) -> int:
    # One untimed call's duration decides how many calls make up a repeat.
    start = time.perf_counter()
    step()
    return max(1, math.ceil(min_repeat_seconds / max(time.perf_counter() - start, 1e-6)))


def take_turns(steps: dict[str, Callable[[], None]], repeats: int, min_repeat_seconds: float = MIN_REPEAT_SECONDS) -> dict[str, list[float]]:
    """Seconds per call of each step, `repeats` times each, the steps taking turns. With
    `min_repeat_seconds` 0 a repeat is a single call."""
    for step in steps.values():  # warm-up: compile, caches, allocator
        step()
    calls = {name: _calls_per_repeat(step, min_repeat_seconds) if min_repeat_seconds > 0 else 1 for name, step in steps.items()}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            time.sleep(SETTLE_SECONDS)
            times[name].append(_time_repeat(steps[name], calls[name]))
    return times
