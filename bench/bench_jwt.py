"""Per-request cost of jwt-check's token verification, with and without its cache.

    .venv/bin/python bench/bench_jwt.py [--n 20000]

Measures ``TokenVerifier.verify`` (what ``JwtCheck.on_request`` spends on a
token) for HS256 and RS256 (2048-bit): "uncached" verifies the signature and
claims every time (cache_size = 0); "cached" is a repeat of the same token
(an LRU hit); "jwt.decode" is bare PyJWT on the same token, for reference.
Reports the best of 5 runs, in microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.jwt_check import JwtCheck, JwtCheckConfig
from plugins.jwt_verify import TokenVerifier, Verified

__all__ = ["main"]

SECRET = "bench-secret-0123456789abcdef-0123456789"


def make_verifier(table: dict[str, Any]) -> TokenVerifier:
    return JwtCheck("jwt", JwtCheckConfig.model_validate(table)).verifier


async def per_request_us(verifier: TokenVerifier, token: str, n: int) -> float:
    assert isinstance(await verifier.verify(token), Verified)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await verifier.verify(token)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def raw_decode_us(token: str, key: Any, alg: str, n: int) -> float:
    """Bare PyJWT decode, the floor under the uncached figure (calibrates a loaded host)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            jwt.decode(token, key, algorithms=[alg], issuer="auth-service")
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


async def run(n: int) -> None:
    claims = {
        "sub": "user-42",
        "org_id": 7,
        "role": "admin",
        "iss": "auth-service",
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
    }
    forward = {"sub": "X-User-Id", "org_id": "X-Org-Id", "role": "X-User-Role"}
    private = rsa.generate_private_key(65537, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "pub.pem"
        pem.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        cases = {
            "HS256": (
                {"algorithms": ["HS256"], "secret": SECRET},
                jwt.encode(claims, SECRET, "HS256"),
            ),
            "RS256": (
                {"algorithms": ["RS256"], "public_key_file": str(pem)},
                jwt.encode(claims, private, "RS256"),
            ),
        }
        keys = {"HS256": SECRET.encode(), "RS256": private.public_key()}
        print(
            f"{'alg':<6} {'jwt.decode µs':>13} {'uncached µs':>12} {'cached µs':>10} "
            f"{'speed-up':>9}   (n={n}, best of 5)"
        )
        for alg, (table, token) in cases.items():
            common = {**table, "issuer": "auth-service", "forward": forward}
            raw = raw_decode_us(token, keys[alg], alg, n)
            cold = await per_request_us(make_verifier({**common, "cache_size": 0}), token, n)
            warm = await per_request_us(make_verifier(common), token, n)
            print(f"{alg:<6} {raw:>13.1f} {cold:>12.1f} {warm:>10.2f} {cold / warm:>8.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="verifications per run")
    asyncio.run(run(parser.parse_args().n))


if __name__ == "__main__":
    main()
