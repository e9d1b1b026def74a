"""TokenVerifier: the verification cache (hit, exp bound, LRU, failures) and tamper properties.

These run the verifier directly (no gateway) because they assert on its cache
and run hundreds of examples; the behaviour through a gateway is in
test_jwt_check.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from plugins.jwt_check import JwtCheck, JwtCheckConfig
from plugins.jwt_verify import Rejection, TokenVerifier, Verified
from tests.support.tokens import claims, sign

SECRET = "s3cret-for-tests-0123456789abcdefghij"


def verifier(**extra: Any) -> TokenVerifier:
    cfg = JwtCheckConfig.model_validate({"algorithms": ["HS256"], "secret": SECRET, **extra})
    return JwtCheck("jwt", cfg).verifier


async def test_cache_hit_skips_verification() -> None:
    v = verifier()
    token = sign(claims(), SECRET)
    first = await v.verify(token)
    assert isinstance(first, Verified)
    assert v.cached(token) is first
    assert await v.verify(token) is first  # the same object: no decode happened


async def test_cache_entry_never_outlives_exp() -> None:
    v = verifier(leeway=0)
    exp = int(time.time()) + 1
    token = sign(claims(exp=exp), SECRET)
    assert isinstance(await v.verify(token), Verified)
    await asyncio.sleep(exp - time.time() + 0.05)
    assert v.cached(token) is None
    result = await v.verify(token)
    assert isinstance(result, Rejection)
    assert result.description == "token expired"


async def test_cache_is_bounded_lru() -> None:
    v = verifier(cache_size=2)
    tokens = [sign(claims(sub=f"u{i}"), SECRET) for i in range(3)]
    for t in tokens[:2]:
        await v.verify(t)
    assert v.cached(tokens[0]) is not None  # touch: tokens[1] is now the oldest
    await v.verify(tokens[2])
    assert v.cached(tokens[1]) is None
    assert v.cached(tokens[0]) is not None
    assert v.cached(tokens[2]) is not None


async def test_cache_disabled_and_failures_never_cached() -> None:
    v = verifier(cache_size=0)
    token = sign(claims(), SECRET)
    assert isinstance(await v.verify(token), Verified)
    assert v.cached(token) is None
    bad = sign(claims(), SECRET[::-1])
    w = verifier()
    assert isinstance(await w.verify(bad), Rejection)
    assert w.cached(bad) is None


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SIGNED = sign(claims(iss="auth-service", exp=2_000_000_000, role="user"), SECRET)
_SIGNED_PART = _SIGNED.rsplit(".", 1)[0]


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, len(_SIGNED_PART) - 1), char=st.sampled_from(_B64URL))
def test_any_change_to_header_or_payload_is_rejected(position: int, char: str) -> None:
    assume(_SIGNED_PART[position] not in (char, "."))
    tampered = _SIGNED_PART[:position] + char + _SIGNED[position + 1 :]
    v = verifier(issuer="auth-service")
    assert isinstance(asyncio.run(v.verify(_SIGNED)), Verified)
    assert isinstance(asyncio.run(v.verify(tampered)), Rejection)
