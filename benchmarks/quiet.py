"""Benchmarks on a shared machine: drop the repetitions other processes disturbed.

`Quiet(threshold, max_wait_s).round(run)` runs `run` after a second in which other processes kept
at most `threshold` cores busy, and reports whether they stayed below it while `run` ran (from
/proc/stat, this process's own CPU time subtracted); a disturbed round is to be dropped and run
again. Past the deadline every round is kept. Used by peers.py and kernel_speed.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat); (0, 0) where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _others_cores(busy0, total0, own0, busy1, total1, own1) -> float:
    """Cores the other processes kept busy between two samples (ours subtracted)."""
    if total1 <= total0:
        return 0.0
    cpus = os.cpu_count() or 1
    window = (total1 - total0) / cpus  # jiffies of wall time per CPU
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, (busy1 - busy0) - (own1 - own0) * hz) / window


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Quiet:
    """The machine is shared: a round of repetitions during which other processes kept more than
    `threshold` of a core busy is dropped and run again (a 2-thread run loses far more than that
    core's share when a thread waits on a busy core at each parallel region's barrier)."""

    def __init__(self, threshold: float, max_wait_s: float):
        self.threshold, self.deadline = threshold, time.monotonic() + max_wait_s
        self.dropped = 0
        self.others_cores: list[float] = []

    def wait(self) -> None:
        """Until a second passes with the others below the threshold (or the deadline)."""
        while time.monotonic() < self.deadline:
            sample = (*_cpu_ticks(), _own_cpu())
            time.sleep(1.0)
            if _others_cores(*sample, *_cpu_ticks(), _own_cpu()) <= self.threshold:
                return

    def round(self, run) -> bool:
        """Run one round; True when it was quiet enough to keep (always True past the deadline)."""
        self.wait()
        sample = (*_cpu_ticks(), _own_cpu())
        run()
        others = _others_cores(*sample, *_cpu_ticks(), _own_cpu())
        if others > self.threshold and time.monotonic() < self.deadline:
            self.dropped += 1
            return False
        self.others_cores.append(others)
        return True


def interleaved(fns: dict, reps: int, warmup: int, quiet: Quiet | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, round-robin: rep r of every fn runs before rep r + 1 of any."""
    times = {name: [] for name in fns}
    kept = 0
    while kept < warmup + reps:
        round_times = {}

        def run():
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                round_times[name] = time.perf_counter() - start

        if quiet is None or kept < warmup:
            run()
        elif not quiet.round(run):
            continue
        if kept >= warmup:
            for name, elapsed in round_times.items():
                times[name].append(elapsed)
        kept += 1
    return times
