"""Prints the hostile-input suite's report (CCPROXY_HOSTILE_REPORT): each case's worst probe
against the budget, so a CI log shows the timings it did not assert."""

from __future__ import annotations

import json
import sys

from tests.e2e.test_hostile_input import PROBE_BUDGET_S


def main(path: str) -> None:
    report = json.loads(open(path).read())
    over = [row for row in report["rows"] if row["probe_max_s"] >= PROBE_BUDGET_S]
    for row in sorted(report["rows"], key=lambda row: -row["probe_max_s"])[:10]:
        mark = "OVER" if row["probe_max_s"] >= PROBE_BUDGET_S else "ok"
        retry = " (retry)" if row["retry"] else ""
        print(f"hostile: {mark} {row['probe_max_s'] * 1000:5.0f} ms  {row['name']} [{row['compression']}]{retry}")
    print(f"hostile: {len(over)} of {len(report['rows'])} attempts over {PROBE_BUDGET_S * 1000:.0f} ms; "
          f"peak {report['peak_mb']:.0f} MB; load average {report['load_average']}")


if __name__ == "__main__":
    main(sys.argv[1])
