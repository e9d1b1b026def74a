"""A fast built-in upstream for the benchmark when nginx is not installed.

A raw asyncio protocol (uvloop when available) answering keep-alive GETs:
``/100b`` with a 100-byte body, ``/64k`` with a 64 KiB body, anything else
with 404. Prints its port on stdout, then serves until terminated.

    python bench/fast_upstream.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

__all__ = ["BODIES", "main"]

BODIES: dict[bytes, bytes] = {b"/100b": b"x" * 100, b"/64k": b"y" * 65536}


def _response(status: bytes, body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\nServer: bench\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


_RESPONSES = {path: _response(b"200 OK", body) for path, body in BODIES.items()}
_NOT_FOUND = _response(b"404 Not Found", b"not found\n")


class _Upstream(asyncio.Protocol):
    """Answers every request head (no request bodies) in order, keep-alive."""

    __slots__ = ("buf", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: no isinstance

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            line = buf[: buf.find(b"\r\n")]
            parts = line.split(b" ")
            target = parts[1].partition(b"?")[0] if len(parts) == 3 else b""
            out.append(_RESPONSES.get(target, _NOT_FOUND))
            buf = buf[end + 4 :]
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
