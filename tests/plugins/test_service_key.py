"""service-key through a real gateway to a recording upstream, plus its load-time checks."""

from __future__ import annotations

import hmac
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from plugins.service_key import ServiceKey, ServiceKeyConfig
from tests.support.gateway import RunningGateway, StartGateway
from tests.support.tokens import Answer, IdentityRecorder, call
from tests.support.upstreams import RecordingUpstream

KEY_A = "key-alpha-0123456789"
KEY_B = "key-bravo-9876543210"


def config(upstream: str, table: str) -> str:
    return f"""
[upstreams.svc]
url = "{upstream}"

[plugins.internal]
type = "service-key"
{table}

[plugins.recorder]
type = "tests.support.tokens:IdentityRecorder"

[[routes]]
name = "internal"
path = "/p"
upstream = "svc"
chain = ["internal", "recorder"]
"""


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def gateway(
    start_gateway: StartGateway, upstream: RecordingUpstream, table: str = ""
) -> RunningGateway:
    return await start_gateway(config(upstream.url, table or f'keys = ["{KEY_A}"]'))


async def send(client: aiohttp.ClientSession, gw: RunningGateway, key: str | None) -> Answer:
    return await call(client, gw, headers={"X-Service-Key": key} if key is not None else None)


def principal(ans: Answer) -> Any:
    return IdentityRecorder.seen[ans.headers["X-Request-ID"]]["principal"]


async def test_right_key_admitted_and_not_forwarded(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream)
    ans = await send(client, gw, KEY_A)
    assert ans.status == 200
    assert recording_upstream.last.header("X-Service-Key") is None  # strip = true (default)
    assert principal(ans) == "internal"  # unnamed keys: the instance name


async def test_wrong_key_403(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream)
    for wrong in (KEY_B, KEY_A + "x", KEY_A[:-1], KEY_A.upper()):
        ans = await send(client, gw, wrong)
        assert ans.status == 403
        assert ans.body["error"] == "forbidden"
        assert ans.body["request_id"] == ans.headers["X-Request-ID"]
        assert "WWW-Authenticate" not in ans.headers
    assert recording_upstream.requests == []


@pytest.mark.parametrize("value", [None, "", "   "], ids=["missing", "empty", "blank"])
async def test_missing_or_empty_key_401(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    value: str | None,
) -> None:
    gw = await gateway(start_gateway, recording_upstream)
    ans = await send(client, gw, value)
    assert ans.status == 401
    assert ans.body["error"] == "unauthorized"
    assert recording_upstream.requests == []


async def test_two_key_headers_refused(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream)
    ans = await call(client, gw, headers=[("X-Service-Key", KEY_A), ("X-Service-Key", KEY_A)])
    assert ans.status == 403
    assert recording_upstream.requests == []


async def test_rotation_both_keys_valid(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream, f'keys = ["{KEY_A}", "{KEY_B}"]')
    assert (await send(client, gw, KEY_A)).status == 200
    assert (await send(client, gw, KEY_B)).status == 200
    assert (await send(client, gw, "key-charlie")).status == 403
    assert len(recording_upstream.requests) == 2


async def test_keys_file_and_named_callers(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# internal callers\n\n  {KEY_B}  \nbilling key-of-billing-42\n# old\n")
    table = (
        f'keys = ["{KEY_A}"]\nkeys_file = "{keys}"\n'
        'key_names = { reports = ["reports-old-key", "reports-new-key"] }'
    )
    gw = await gateway(start_gateway, recording_upstream, table)
    expected = {
        KEY_A: "internal",
        KEY_B: "internal",
        "key-of-billing-42": "billing",
        "reports-old-key": "reports",
        "reports-new-key": "reports",
    }
    for key, who in expected.items():
        ans = await send(client, gw, key)
        assert ans.status == 200, key
        assert principal(ans) == who
    for not_a_key in ("# internal callers", "# old", "billing", "billing key-of-billing-42"):
        assert (await send(client, gw, not_a_key)).status == 403


async def test_strip_false_forwards_key(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream, f'keys = ["{KEY_A}"]\nstrip = false')
    assert (await send(client, gw, KEY_A)).status == 200
    assert recording_upstream.last.header("X-Service-Key") == KEY_A


async def test_custom_header(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(
        start_gateway, recording_upstream, f'header = "X-Api-Key"\nkeys = ["{KEY_A}"]'
    )
    assert (await call(client, gw, headers={"x-api-key": KEY_A})).status == 200
    assert recording_upstream.last.header("X-Api-Key") is None
    assert (await send(client, gw, KEY_A)).status == 401  # the default header is not looked at


# --- timing-safe comparison -------------------------------------------------------------


@contextmanager
def count_compare_digest() -> Iterator[list[int]]:
    """Count calls of hmac.compare_digest in this thread (a profiler, not a patch)."""
    calls = [0]
    target = hmac.compare_digest

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and arg is target:
            calls[0] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


@pytest.mark.parametrize("presented", [KEY_A, KEY_B, "key-charlie", "x" * 1000])
def test_every_key_compared_with_compare_digest(presented: str) -> None:
    keys = [KEY_A, KEY_B, "key-delta", "key-echo"]
    plugin = ServiceKey("internal", ServiceKeyConfig.model_validate({"keys": keys}))
    with count_compare_digest() as calls:
        found = plugin.match(presented)
    assert calls[0] == len(keys)  # no early exit, whichever key matched (or none)
    assert found == ("internal" if presented in keys else None)


async def test_compare_digest_on_the_request_path(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await gateway(start_gateway, recording_upstream, f'keys = ["{KEY_A}", "{KEY_B}", "k3"]')
    with count_compare_digest() as calls:
        assert (await send(client, gw, KEY_A)).status == 200
    assert calls[0] == 3


# --- load-time checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "at least one key is required"),
        ({"keys": []}, "at least one key is required"),
        ({"keys": [""]}, "empty key"),
        ({"keys": ["ok-key", ""]}, "empty key"),
        ({"keys": [" padded "]}, "whitespace"),
        ({"keys": ["a\nb"]}, "whitespace or control"),
        ({"key_names": {"svc": ""}}, "empty key"),
        ({"key_names": {"a": "same", "b": "same"}}, "two different callers"),
        ({"key_names": {"bad name": "k"}}, "usable caller name"),
        ({"keys": ["k"], "header": "Bad Header"}, "valid header name"),
        ({"keys": ["k"], "extra": 1}, "Extra inputs"),
    ],
)
def test_config_rejected_at_load(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServiceKeyConfig.model_validate(table)


def test_keys_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        ServiceKeyConfig.model_validate({"keys_file": str(tmp_path / "missing")})
    bad = tmp_path / "bad.txt"
    bad.write_text("one two three\n")
    with pytest.raises(ValidationError, match="line 1"):
        ServiceKeyConfig.model_validate({"keys_file": str(bad)})
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValidationError, match="at least one key"):
        ServiceKeyConfig.model_validate({"keys_file": str(empty)})


def test_keys_not_shown_in_repr() -> None:
    cfg = ServiceKeyConfig.model_validate({"keys": [KEY_A], "key_names": {"b": KEY_B}})
    assert KEY_A not in repr(cfg)
    assert KEY_B not in repr(cfg)
