"""The soak's gateway process: ``aiogateway serve`` plus a task-count probe.

Runs the gateway exactly as the CLI does (uvloop, logging, gc.freeze, signals
via :func:`aiogateway.runner._serve`) and writes ``len(asyncio.all_tasks())``
to ``--stats`` every second, so the soak can sample the task count from
outside the process (RSS and fds it reads with psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiogateway.logs import setup_logging
from aiogateway.runner import _serve, install_uvloop
from aiogateway.server import Gateway


async def _sample(stats: Path) -> None:
    tmp = stats.with_suffix(".tmp")
    while True:
        tmp.write_text(str(len(asyncio.all_tasks())))
        tmp.replace(stats)
        await asyncio.sleep(1.0)


async def _main(config: Path, port: int, stats: Path) -> int:
    gateway = Gateway(config, host="127.0.0.1", port=port)
    sampler = asyncio.ensure_future(_sample(stats))
    try:
        return await _serve(gateway)
    finally:
        sampler.cancel()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    setup_logging("warning")
    install_uvloop()
    return asyncio.run(_main(args.config, args.port, args.stats))


if __name__ == "__main__":
    sys.exit(main())
