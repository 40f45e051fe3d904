"""Compare two `zfabric bench -o FILE` results: each figure's zfabric/raw ratio before and after.

    python benchmarks/compare.py benchmarks/results/before.json benchmarks/results/after.json
"""

from __future__ import annotations

import json
import sys


def main(before_path: str, after_path: str) -> None:
    before = {r["figure"]: r for r in json.load(open(before_path))["rows"]}
    after = json.load(open(after_path))["rows"]
    print(f"{'figure':70} {'before':>8} {'after':>8}")
    for row in after:
        old = before.get(row["figure"], {}).get("ratio")
        new = row.get("ratio")
        fmt = lambda r: f"{r:.2f}x" if r is not None else "-"  # noqa: E731
        print(f"{row['figure'][:70]:70} {fmt(old):>8} {fmt(new):>8}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
