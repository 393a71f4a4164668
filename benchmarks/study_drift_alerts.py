"""How often the FNR drift alert fires falsely, and how fast it catches a real drift.

    .venv/bin/python benchmarks/study_drift_alerts.py --runs 200 --seed 0

Simulates one line's labelled defects with the worker's own :class:`DriftMonitor`
(the same windows and tests as in production, without Kafka): ``--calm`` defects
at the baseline FNR, then ``--drifted`` defects at a higher FNR. The check runs
after every labelled defect, which is the worst case for false alarms (the
worker checks on a timer, so usually after several new labels).

Prints, for each (baseline FNR, drifted FNR): false alarms per 1000 calm defects,
the share of runs that caught the drift, and the median number of labelled
defects from the drift's start to the alert.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
from pathlib import Path

from qcstream.settings import Settings
from qcstream.storage.drift import DefectCounts
from qcstream.streams.alerts import DriftMonitor


def simulate(settings: Settings, misses: list[bool], calm: int) -> tuple[int, int | None]:
    """Run the checks over ``misses`` (oldest first); return (false alarms in the calm part, delay to the first alert after it)."""
    recent_n, baseline_n = settings.alert_recent_defects, settings.alert_baseline_defects
    state = {"seen": 0}

    def counts() -> list[DefectCounts]:
        history = misses[: state["seen"]][::-1]
        recent, baseline = history[:recent_n], history[recent_n : recent_n + baseline_n]
        return [DefectCounts("L1", len(recent), sum(recent), len(baseline), sum(baseline), None, None)]

    monitor = DriftMonitor(settings, counts=counts, open_episodes={})
    false_alarms, delay = 0, None
    for seen in range(1, len(misses) + 1):
        state["seen"] = seen
        for alert in monitor.check(now=float(seen)):
            monitor.record(alert)
            if alert.state != "firing":
                continue
            if seen <= calm:
                false_alarms += 1
            elif delay is None:
                delay = seen - calm
    return false_alarms, delay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="simulated lines per setting")
    parser.add_argument("--calm", type=int, default=1000, help="labelled defects before the drift")
    parser.add_argument("--drifted", type=int, default=200, help="labelled defects after it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = dataclasses.replace(Settings.from_env(), data_dir=Path("/nonexistent"))
    rng = random.Random(args.seed)
    print(
        f"recent window {settings.alert_recent_defects} defects, baseline up to {settings.alert_baseline_defects} "
        f"(at least {settings.alert_min_baseline_defects}), alert at p < {settings.alert_p_value}, "
        f"clear at p > {settings.alert_clear_p_value}; {args.runs} runs, {args.calm} calm + {args.drifted} drifted defects\n"
    )
    print("| baseline FNR | drifted FNR | false alarms per 1000 calm defects | drift caught | median delay (labelled defects) |")
    print("|---|---|---|---|---|")
    for base, drifted in ((0.05, 0.05), (0.05, 0.15), (0.05, 0.25), (0.05, 0.40), (0.20, 0.40), (0.20, 0.60)):
        alarms, delays = 0, []
        for _ in range(args.runs):
            misses = [rng.random() < base for _ in range(args.calm)] + [rng.random() < drifted for _ in range(args.drifted)]
            false_alarms, delay = simulate(settings, misses, args.calm)
            alarms += false_alarms
            if delay is not None:
                delays.append(delay)
        caught = "-" if drifted == base else f"{len(delays) / args.runs:.0%}"
        median = f"{statistics.median(delays):.0f}" if delays and drifted != base else "-"
        print(f"| {base:.2f} | {drifted:.2f} | {1000 * alarms / (args.runs * args.calm):.2f} | {caught} | {median} |")


if __name__ == "__main__":
    main()
