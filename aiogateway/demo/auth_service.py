"""A minimal auth-service for the demo and end-to-end tests (in memory, not product).

It answers the seed's auth endpoints behind the gateway: sign-up and sign-in
issue HS256 access tokens (``JWT_SECRET``, issuer ``auth-service``) that the
gateway's jwt-check accepts; protected endpoints trust the identity headers
the gateway forwards (``X-User-Id``, ``X-Org-Id``) — the gateway strips any a
client sends. Users, organisations, invites and refresh tokens live in memory.
Its own OpenAPI 3.1 document (:mod:`.auth_openapi`) is at ``/openapi.json``,
which the gateway merges into its /docs.

Run: ``JWT_SECRET=... python -m aiogateway.demo.auth_service --port 8001``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from aiohttp import web

from .auth_openapi import document

__all__ = ["ISSUER", "AuthState", "main", "make_app"]

ISSUER = "auth-service"
ACCESS_TTL = 900
ROLES = ("owner", "admin", "member")


@dataclass
class User:
    id: str
    email: str
    name: str
    salt: bytes
    password_hash: bytes
    current_org: str | None = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "email": self.email, "name": self.name}


@dataclass
class Org:
    id: str
    name: str
    members: dict[str, str] = field(default_factory=dict)  # user id -> role

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "members": len(self.members)}


@dataclass
class AuthState:
    secret: str
    users: dict[str, User] = field(default_factory=dict)
    by_email: dict[str, str] = field(default_factory=dict)
    orgs: dict[str, Org] = field(default_factory=dict)
    invites: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # org, email, role
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token -> user id

    def tokens(self, user: User) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": user.id,
            "iat": now,
            "exp": now + ACCESS_TTL,
        }
        if user.current_org is not None:
            claims["org_id"] = user.current_org
            claims["role"] = self.orgs[user.current_org].members.get(user.id, "member")
        refresh = secrets.token_urlsafe(32)
        self.refresh[refresh] = user.id
        return {
            "access_token": jwt.encode(claims, self.secret, algorithm="HS256"),
            "refresh_token": refresh,
            "token_type": "bearer",
            "expires_in": ACCESS_TTL,
        }


STATE = web.AppKey("state", AuthState)


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def _body(request: web.Request, *keys: str) -> dict[str, str] | web.Response:
    try:
        data = await request.json()
    except ValueError:
        return _error(400, "bad_request", "expected a JSON object")
    if not isinstance(data, dict):
        return _error(400, "bad_request", "expected a JSON object")
    missing = [k for k in keys if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        return _error(400, "bad_request", f"missing string field(s): {', '.join(missing)}")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _state(request: web.Request) -> AuthState:
    return request.app[STATE]


def _caller(request: web.Request) -> User | web.Response:
    """The user the gateway vouches for (X-User-Id from the verified token)."""
    user = _state(request).users.get(request.headers.get("X-User-Id", ""))
    return user if user is not None else _error(401, "unauthorized", "unknown user")


def _org_for(request: web.Request, user: User, *roles: str) -> Org | web.Response:
    org = _state(request).orgs.get(request.match_info["id"])
    if org is None:
        return _error(404, "not_found", "no such organization")
    role = org.members.get(user.id)
    if role is None or (roles and role not in roles):
        return _error(403, "forbidden", "not allowed in this organization")
    return org


def _members(state: AuthState, org: Org) -> list[dict[str, Any]]:
    return [{**state.users[uid].public(), "role": role} for uid, role in org.members.items()]


def _orgs_of(state: AuthState, user_id: str) -> list[dict[str, Any]]:
    return [
        {"id": o.id, "name": o.name, "role": o.members[user_id]}
        for o in state.orgs.values()
        if user_id in o.members
    ]


# -- public ------------------------------------------------------------------------


async def sign_up(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _body(request, "email", "password")
    if isinstance(body, web.Response):
        return body
    email = body["email"].strip().lower()
    if email in state.by_email:
        return _error(409, "conflict", "email already registered")
    salt = os.urandom(16)
    user = User(
        str(uuid.uuid4()), email, body.get("name", email), salt, _hash(body["password"], salt)
    )
    state.users[user.id] = user
    state.by_email[email] = user.id
    return web.json_response({"user": user.public(), **state.tokens(user)}, status=201)


async def sign_in(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _body(request, "email", "password")
    if isinstance(body, web.Response):
        return body
    user = state.users.get(state.by_email.get(body["email"].strip().lower(), ""))
    if user is None or not hmac.compare_digest(
        _hash(body["password"], user.salt), user.password_hash
    ):
        return _error(401, "unauthorized", "wrong email or password")
    return web.json_response({"user": user.public(), **state.tokens(user)})


async def refresh_token(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _body(request, "refresh_token")
    if isinstance(body, web.Response):
        return body
    user_id = state.refresh.pop(body["refresh_token"], None)  # rotated: one use each
    if user_id is None:
        return _error(401, "unauthorized", "unknown refresh token")
    return web.json_response(state.tokens(state.users[user_id]))


async def logout(request: web.Request) -> web.Response:
    body = await _body(request, "refresh_token")
    if isinstance(body, web.Response):
        return body
    _state(request).refresh.pop(body["refresh_token"], None)
    return web.json_response({"logged_out": True})


# -- Bearer JWT (identity from the gateway) -------------------------------------------


async def me(request: web.Request) -> web.Response:
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    orgs = _orgs_of(_state(request), user.id)
    current = request.headers.get("X-Org-Id")
    return web.json_response({**user.public(), "org_id": current, "orgs": orgs})


async def switch_org(request: web.Request) -> web.Response:
    state = _state(request)
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    body = await _body(request, "org_id")
    if isinstance(body, web.Response):
        return body
    org = state.orgs.get(body["org_id"])
    if org is None or user.id not in org.members:
        return _error(403, "forbidden", "not a member of that organization")
    user.current_org = org.id
    return web.json_response(state.tokens(user))


async def create_org(request: web.Request) -> web.Response:
    state = _state(request)
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    body = await _body(request, "name")
    if isinstance(body, web.Response):
        return body
    org = Org(str(uuid.uuid4()), body["name"], {user.id: "owner"})
    state.orgs[org.id] = org
    return web.json_response(org.public(), status=201)


async def list_members(request: web.Request) -> web.Response:
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    org = _org_for(request, user)
    if isinstance(org, web.Response):
        return org
    return web.json_response({"members": _members(_state(request), org)})


async def invite(request: web.Request) -> web.Response:
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    org = _org_for(request, user, "owner", "admin")
    if isinstance(org, web.Response):
        return org
    body = await _body(request, "email")
    if isinstance(body, web.Response):
        return body
    role = body.get("role", "member")
    if role not in ROLES[1:]:
        return _error(400, "bad_request", "role must be admin or member")
    token = secrets.token_urlsafe(16)
    _state(request).invites[token] = (org.id, body["email"].strip().lower(), role)
    return web.json_response({"invite_token": token, "org_id": org.id, "role": role}, status=201)


async def accept_invite(request: web.Request) -> web.Response:
    state = _state(request)
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    body = await _body(request, "token")
    if isinstance(body, web.Response):
        return body
    found = state.invites.get(body["token"])
    if found is None or found[1] != user.email:
        return _error(404, "not_found", "no such invite for this user")
    del state.invites[body["token"]]
    org_id, _, role = found
    state.orgs[org_id].members[user.id] = role
    return web.json_response({"org_id": org_id, "role": role})


async def remove_member(request: web.Request) -> web.Response:
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    org = _org_for(request, user, "owner", "admin")
    if isinstance(org, web.Response):
        return org
    target = request.match_info["user_id"]
    if org.members.get(target) in (None, "owner"):
        return _error(404, "not_found", "no such (removable) member")
    del org.members[target]
    return web.json_response({"removed": target})


async def update_role(request: web.Request) -> web.Response:
    user = _caller(request)
    if isinstance(user, web.Response):
        return user
    org = _org_for(request, user, "owner")
    if isinstance(org, web.Response):
        return org
    body = await _body(request, "role")
    if isinstance(body, web.Response):
        return body
    target = request.match_info["user_id"]
    if target not in org.members or body["role"] not in ROLES[1:]:
        return _error(400, "bad_request", "unknown member, or role not admin/member")
    org.members[target] = body["role"]
    return web.json_response({"user_id": target, "role": body["role"]})


# -- internal (service key checked by the gateway) -----------------------------------


async def validate(request: web.Request) -> web.Response:
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    try:
        claims = jwt.decode(token, _state(request).secret, algorithms=["HS256"], issuer=ISSUER)
    except jwt.PyJWTError as exc:
        return _error(401, "unauthorized", f"invalid token: {exc}")
    return web.json_response({"valid": True, "claims": claims})


async def get_user(request: web.Request) -> web.Response:
    user = _state(request).users.get(request.match_info["id"])
    return web.json_response(user.public()) if user else _error(404, "not_found", "no such user")


async def get_user_orgs(request: web.Request) -> web.Response:
    state = _state(request)
    user_id = request.match_info["id"]
    if user_id not in state.users:
        return _error(404, "not_found", "no such user")
    return web.json_response({"orgs": _orgs_of(state, user_id)})


async def get_org(request: web.Request) -> web.Response:
    org = _state(request).orgs.get(request.match_info["id"])
    return web.json_response(org.public()) if org else _error(404, "not_found", "no such org")


async def get_org_members(request: web.Request) -> web.Response:
    state = _state(request)
    org = state.orgs.get(request.match_info["id"])
    if org is None:
        return _error(404, "not_found", "no such org")
    return web.json_response({"members": _members(state, org)})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _openapi_handler() -> Any:
    body = orjson.dumps(document())

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi


def make_app(secret: str) -> web.Application:
    app = web.Application()
    app[STATE] = AuthState(secret)
    app.add_routes(
        [
            web.post("/v1/client/sign-up", sign_up),
            web.post("/v1/client/sign-in/password", sign_in),
            web.post("/v1/client/refresh_token", refresh_token),
            web.post("/v1/client/logout", logout),
            web.get("/v1/client/me", me),
            web.patch("/v1/client/switch-org", switch_org),
            web.post("/v1/org", create_org),
            web.get("/v1/org/{id}/members", list_members),
            web.post("/v1/org/{id}/invite", invite),
            web.post("/v1/invite/accept", accept_invite),
            web.delete("/v1/org/{id}/member/{user_id}", remove_member),
            web.patch("/v1/org/{id}/member/{user_id}/role", update_role),
            web.get("/auth/validate", validate),
            web.get("/auth/user/{id}", get_user),
            web.get("/auth/user/{id}/orgs", get_user_orgs),
            web.get("/auth/org/{id}", get_org),
            web.get("/auth/org/{id}/members", get_org_members),
            web.get("/healthz", healthz),
            web.get("/openapi.json", _openapi_handler()),
        ]
    )
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="demo auth-service")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    secret = os.environ.get("JWT_SECRET", "")
    if len(secret.encode()) < 32:
        parser.error("JWT_SECRET must be set (at least 32 bytes, shared with the gateway)")
    web.run_app(make_app(secret), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
