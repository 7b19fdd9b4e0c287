"""A CPU hog with known bursts at a known SCHED_FIFO priority, pinned to one CPU (test noise only).

    python -m tests.host.rthog --cpu 1 --priority 60 --burst-ms 3 --period-ms 20 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import time

from agentlat.tuners.kernel import prctl

COMM = "agentlat-hog"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", type=int, required=True)
    parser.add_argument("--priority", type=int, default=60)
    parser.add_argument("--burst-ms", type=float, default=3.0)
    parser.add_argument("--period-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    prctl.set_comm(COMM)
    os.sched_setaffinity(0, {args.cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.priority))
    end = time.monotonic() + args.seconds
    burst, period = args.burst_ms / 1000, args.period_ms / 1000
    while (start := time.monotonic()) < end:
        while time.monotonic() - start < burst:
            pass
        time.sleep(max(period - burst, 0.0))


if __name__ == "__main__":
    main()
