"""Shared test set-up: float32 on the CPU, and a summary of the measured parity errors.

A parity test calls `record_property(name, value)` with each error it measures; at the end of the
run the worst value per test is printed ("measured parity errors"), also under pytest-xdist,
whose workers send `user_properties` back with their reports.
"""

from __future__ import annotations

import os
from collections import defaultdict

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    worst: dict[tuple[str, str], float] = defaultdict(float)
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        if report.when != "call":
            continue
        test = report.nodeid.split("::")[-1].split("[")[0]
        for name, value in report.user_properties:
            if isinstance(value, float):
                worst[test, name] = max(worst[test, name], value)
    if worst:
        terminalreporter.section("measured parity errors (worst over each test's parameters)")
        for (test, name), value in sorted(worst.items()):
            terminalreporter.write_line(f"{test:<58} {name:<28} {value:.3e}")
