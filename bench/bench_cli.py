"""Start-up of the ``iotpipe`` command: ``iotpipe --version`` against ``import typer``.

    .venv/bin/python bench/bench_cli.py [--repeat 10] [--no-save]

Wall time of ``iotpipe --version`` (the installed script, a subprocess) and, as the baseline
measured in the same run and the same way, of ``python -c "import typer"``: the least any typer
command line costs. Medians of ``--repeat`` runs each, interleaved so both see the same machine.
Target: ratio <= 2.0 (the root imports no component for --version or --help; iotpipe.commands).
Also reported: ``iotpipe --help``. Prints one JSON object and writes ``bench/results/cli.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cli.json"
TARGET_RATIO = 2.0
IOTPIPE = Path(sys.executable).with_name("iotpipe")


def wall(argv: list[str]) -> float:
    """Seconds from spawn to exit of ``argv``."""
    started = time.perf_counter()
    subprocess.run(
        argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"}
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    commands = {
        "import_typer": [sys.executable, "-c", "import typer"],
        "iotpipe_version": [str(IOTPIPE), "--version"],
        "iotpipe_help": [str(IOTPIPE), "--help"],
    }
    for argv in commands.values():  # warm the file cache once
        wall(argv)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, argv in commands.items():
            times[name].append(wall(argv))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["iotpipe_version"] / median["import_typer"]
    result = {
        "benchmark": "iotpipe --version vs python -c 'import typer', wall time",
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "repeat": args.repeat,
        "median_ms": {name: round(value * 1000, 1) for name, value in median.items()},
        "ratio_version_to_import_typer": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
