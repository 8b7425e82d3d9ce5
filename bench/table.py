"""Print every figure in bench/latest.json as one table (what `make bench` ends with).

    python bench/table.py [--json bench/latest.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import LATEST, read, table  # noqa: E402


def machine() -> str:
    """CPU count and model, the first NVIDIA GPU if any, and the load: the table's context."""
    import os

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The GPU from the driver's files, not torch: importing torch would take longer than the table.
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    gpu = "no GPU"
    if gpus:
        lines = gpus[0].read_text().splitlines()
        gpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model")), "GPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores ({model}), {gpu}, load average {load:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=LATEST)
    args = ap.parse_args(argv)
    try:
        data = read(args.json)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        print(f"bench/table.py: cannot read {args.json}: {e}; rerun `make bench`",
              file=sys.stderr)
        return 2
    if not data:
        print(f"bench/table.py: no figures in {args.json}; run `make bench` first",
              file=sys.stderr)
        return 2
    print(f"\n{args.json} ({machine()}):\n")
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
