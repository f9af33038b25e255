"""Wall time of the embedded quickstart (target: under 3 minutes on a 2-core CPU).

.venv/bin/python benchmarks/quickstart_time.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from advprune.quickstart import format_table, run_quickstart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="advprune-qs-")
    t0 = time.perf_counter()
    rows = run_quickstart(out, progress=False)
    seconds = time.perf_counter() - t0
    print(format_table(rows))
    print(f"quickstart wall time: {seconds:.1f} s (target < 180 s)")


if __name__ == "__main__":
    main()
