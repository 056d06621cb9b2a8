"""How long the ``sqla-tenancy`` command takes to answer ``--help`` and a usage error, against a
bare ``python -c pass`` measured in the same rounds (interleaved; medians). No database needed.

    python benchmarks/bench_cli.py [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")
ARMS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "sqla-tenancy --help": [SCRIPT, "--help"],
    "sqla-tenancy tenants list --help": [SCRIPT, "tenants", "list", "--help"],
    "usage error (exit 2)": [SCRIPT, "tenants", "list", "--no-such-option"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds (a smoke run)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for i in range(rounds):
        order = list(ARMS) if i % 2 == 0 else list(reversed(ARMS))
        for name in order:
            started = time.perf_counter()
            subprocess.run(ARMS[name], capture_output=True, check=False)
            times[name].append(time.perf_counter() - started)
    floor = statistics.median(times["python -c pass (floor)"])
    print(f"{rounds} interleaved rounds, medians:")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:36} {median * 1000:7.1f} ms   {median / floor:5.2f}x the floor")


if __name__ == "__main__":
    main()
