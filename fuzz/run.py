"""Run the fuzz targets for a bounded time: ``make fuzz`` (FUZZ_SECONDS, default 60).

Without atheris, each target's hypothesis test is fed random buffers through
``fuzz_one_input`` (hypothesis turns bytes into structured inputs: paths made
of ``%2e``/``..``/``//`` atoms, route tables, header lists) for its share of
the time; with ``--atheris`` (and atheris installed) atheris drives the same
entry points coverage-guided, one target per run. Also runs the config
property tests with many examples (``--config-examples``). Prints executions
per target and exits non-zero on the first failure, with the input.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.targets import TARGETS


def run_random(name: str, seconds: float, seed: int) -> int:
    fuzz_one = TARGETS[name].hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        for _ in range(100):
            fuzz_one(rng.randbytes(rng.choice((16, 64, 256, 1024))))
            runs += 1
    return runs


def run_atheris(name: str, seconds: float) -> None:
    import atheris  # type: ignore[import-not-found]

    fuzz_one = TARGETS[name].hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}"], fuzz_one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60"))
    )
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED") or time.time()))
    parser.add_argument("--target", choices=sorted(TARGETS), action="append")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (one target)")
    parser.add_argument("--config-examples", type=int, default=500)
    args = parser.parse_args()
    names = args.target or sorted(TARGETS)
    if args.atheris:
        run_atheris(names[0], args.seconds)
        return 0
    # A fifth of the budget for the config property tests, the rest split over targets.
    share = args.seconds * 0.8 / len(names)
    print(f"fuzz: seed {args.seed}, {share:.0f}s per target", flush=True)
    total = 0
    failed: list[str] = []
    for i, name in enumerate(names):
        started = time.monotonic()
        try:
            runs = run_random(name, share, args.seed + i)
        except Exception as exc:  # hypothesis printed the falsifying input above
            failed.append(name)
            print(f"fuzz: {name:15} FAILED after {time.monotonic() - started:.1f}s: {exc!r}")
            continue
        took = time.monotonic() - started
        total += runs
        print(
            f"fuzz: {name:15} {runs:8d} inputs in {took:5.1f}s ({runs / took:7.0f}/s), no failure"
        )
    env = {**os.environ, "CONFIG_PROPERTY_EXAMPLES": str(args.config_examples)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_config_property.py"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        check=False,
    )  # fmt: skip
    print(
        f"fuzz: config properties, {args.config_examples} examples per property, "
        f"{time.monotonic() - started:.0f}s: {'ok' if result.returncode == 0 else 'FAILED'}"
    )
    print(f"fuzz: {total} inputs over {len(names)} targets; failed: {failed or 'none'}")
    return 1 if failed or result.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
