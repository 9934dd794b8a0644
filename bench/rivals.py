"""APF against its rivals: FedAvg, APF, FedProx and GWPF side by side with ``apf-ray compare``.

The default workload (``configs/digits-lenet5.yaml``: digits, LeNet-5, 20 extremely non-IID
clients, 10 per round, 10 local steps) for ``--rounds`` rounds (40: about 10 minutes on one
loaded core), in-process (a Ray run gives the same numbers). Each strategy runs with its own
defaults (APF at the config's T = 0.2, FedProx at mu = 0.01, GWPF at threshold 0.01).
Writes ``docs/results/rivals.json`` (the command, the rows of ``compare.json``, the machine
and its load) and prints the table as Markdown:

    nice -n 10 python3 bench/rivals.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from provenance import command, machine, now
from readme_results import DEFAULT_CONFIG, timed, write

VARIANTS = ["fedavg", "apf", "fedprox:mu=0.01", "gwpf"]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy, bytes (MB = 10^6 bytes) and savings against the first row (FedAvg)."""
    header = ["variant", "final acc", "best acc", "uplink MB", "total MB", "uplink saving", "total saving",
              "frozen (final)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
                     f"{r['bytes_up'] / 1e6:.1f} | {(r['bytes_up'] + r['bytes_down']) / 1e6:.1f} | "
                     f"{100 * r['uplink_saving']:.1f}% | {100 * r['total_saving']:.1f}% | "
                     f"{100 * r['frozen_fraction_final']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds of every run (default 40)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apf-rivals-") as tmp:
        out = Path(tmp) / "rivals"
        wall, _, load = timed([sys.executable, "-m", "apf_ray.cli", "compare", "--inprocess", "--quiet",
                               "--config", DEFAULT_CONFIG, "--set", f"train.rounds={args.rounds}",
                               "--strategies", *VARIANTS, "--output", str(out)])
        report = json.loads((out / "compare.json").read_text())
    write("rivals", {
        "command": command(),
        "compare": f"apf-ray compare --inprocess --config {DEFAULT_CONFIG} --set train.rounds={args.rounds} "
                   f"--strategies {' '.join(VARIANTS)}",
        "backend": "inprocess", "rounds": args.rounds, "rows": report["rows"], "wall_s": round(wall, 1),
        "date": now(), "machine": machine(), "load_average": load})
    print(table(report["rows"]))


if __name__ == "__main__":
    main()
