"""The sample auth-service's own OpenAPI 3.1 document, served at its /openapi.json.

It describes the endpoints :func:`aiogateway.demo.auth_service.make_app`
really answers, with their request and response bodies, the way a FastAPI
service publishes its own. The gateway (``openapi = "/openapi.json"`` on
``[upstreams.auth]`` in config.toml) merges it under its routes, so /docs shows
these bodies; the identity headers listed here (``X-User-Id``, ``X-Org-Id``)
are set by the gateway, which drops them from its own document.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DOCUMENT", "document"]

JsonDict = dict[str, Any]

STRING: JsonDict = {"type": "string"}
ROLE: JsonDict = {"type": "string", "enum": ["owner", "admin", "member"]}
GRANTABLE_ROLE: JsonDict = {"type": "string", "enum": ["admin", "member"]}


def _ref(name: str) -> JsonDict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], description: str = "", **properties: Any) -> JsonDict:
    out: JsonDict = {"type": "object", "required": required, "properties": properties}
    if description:
        out["description"] = description
    return out


def _json(schema: str, description: str) -> JsonDict:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> JsonDict:
    about = {
        400: "The body is not a JSON object or lacks a field.",
        401: "Unknown user, wrong credentials or an invalid token.",
        403: "Not allowed in this organization.",
        404: "No such resource.",
        409: "Already exists.",
    }
    return {str(s): _json("Error", about[s]) for s in statuses}


def _path(name: str, description: str) -> JsonDict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": STRING,
    }


ORG_ID = _path("id", "The organization's id.")
USER_ID = _path("user_id", "The member's user id.")
# Set by the gateway from the verified token; a client cannot send them through it.
IDENTITY = [
    {"name": "X-User-Id", "in": "header", "required": True, "schema": STRING},
    {"name": "X-Org-Id", "in": "header", "required": False, "schema": STRING},
]


def _op(
    summary: str,
    op_id: str,
    responses: JsonDict,
    *,
    body: str | None = None,
    params: list[JsonDict] | None = None,
    tag: str = "client",
    description: str = "",
) -> JsonDict:
    out: JsonDict = {"tags": [tag], "summary": summary, "operationId": op_id}
    if description:
        out["description"] = description
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    out["responses"] = responses
    return out


def _paths() -> JsonDict:
    me = [*IDENTITY]
    org = [ORG_ID, *IDENTITY]
    member = [ORG_ID, USER_ID, *IDENTITY]
    return {
        "/v1/client/sign-up": {
            "post": _op(
                "Sign up",
                "sign_up",
                {"201": _json("Session", "Registered; signed in."), **_errors(400, 409)},
                body="SignUp",
            )
        },
        "/v1/client/sign-in/password": {
            "post": _op(
                "Sign in with a password",
                "sign_in_password",
                {"200": _json("Session", "Signed in."), **_errors(400, 401)},
                body="SignIn",
            )
        },
        "/v1/client/refresh_token": {
            "post": _op(
                "Refresh the access token",
                "refresh_token",
                {"200": _json("Tokens", "New tokens."), **_errors(400, 401)},
                body="RefreshToken",
                description="The refresh token is rotated: each one works once.",
            )
        },
        "/v1/client/logout": {
            "post": _op(
                "Log out",
                "logout",
                {"200": _json("LoggedOut", "The refresh token is revoked."), **_errors(400)},
                body="RefreshToken",
            )
        },
        "/v1/client/me": {
            "get": _op(
                "The signed-in user",
                "me",
                {"200": _json("Me", "The user and their organizations."), **_errors(401)},
                params=me,
            )
        },
        "/v1/client/switch-org": {
            "patch": _op(
                "Switch the current organization",
                "switch_org",
                {
                    "200": _json("Tokens", "Tokens carrying org_id and role."),
                    **_errors(400, 401, 403),
                },
                body="SwitchOrg",
                params=me,
            )
        },
        "/v1/org": {
            "post": _op(
                "Create an organization",
                "create_org",
                {"201": _json("Org", "Created; the caller owns it."), **_errors(400, 401)},
                body="OrgCreate",
                params=me,
                tag="organizations",
            )
        },
        "/v1/org/{id}/members": {
            "get": _op(
                "List the members",
                "list_members",
                {"200": _json("MemberList", "The members."), **_errors(401, 403, 404)},
                params=org,
                tag="organizations",
            )
        },
        "/v1/org/{id}/invite": {
            "post": _op(
                "Invite a user by email",
                "invite_user",
                {"201": _json("Invite", "The invite."), **_errors(400, 401, 403, 404)},
                body="InviteCreate",
                params=org,
                tag="organizations",
                description="Owners and admins only.",
            )
        },
        "/v1/invite/accept": {
            "post": _op(
                "Accept an invite",
                "accept_invite",
                {"200": _json("InviteAccepted", "Now a member."), **_errors(400, 401, 404)},
                body="InviteAccept",
                params=me,
                tag="organizations",
            )
        },
        "/v1/org/{id}/member/{user_id}": {
            "delete": _op(
                "Remove a member",
                "remove_member",
                {"200": _json("MemberRemoved", "Removed."), **_errors(401, 403, 404)},
                params=member,
                tag="organizations",
                description="Owners and admins only; an owner cannot be removed.",
            )
        },
        "/v1/org/{id}/member/{user_id}/role": {
            "patch": _op(
                "Change a member's role",
                "update_member_role",
                {"200": _json("RoleUpdated", "Updated."), **_errors(400, 401, 403, 404)},
                body="RoleUpdate",
                params=member,
                tag="organizations",
                description="Owners only.",
            )
        },
        "/auth/validate": {
            "get": _op(
                "Validate an access token",
                "validate_token",
                {"200": _json("TokenValidation", "Valid; its claims."), **_errors(401)},
                tag="internal",
                description="The token to check is sent as `Authorization: Bearer <token>`.",
            )
        },
        "/auth/user/{id}": {
            "get": _op(
                "A user",
                "get_user",
                {"200": _json("User", "The user."), **_errors(404)},
                params=[_path("id", "The user's id.")],
                tag="internal",
            )
        },
        "/auth/user/{id}/orgs": {
            "get": _op(
                "A user's organizations",
                "get_user_orgs",
                {"200": _json("OrgList", "With the user's role in each."), **_errors(404)},
                params=[_path("id", "The user's id.")],
                tag="internal",
            )
        },
        "/auth/org/{id}": {
            "get": _op(
                "An organization",
                "get_org",
                {"200": _json("Org", "The organization."), **_errors(404)},
                params=[ORG_ID],
                tag="internal",
            )
        },
        "/auth/org/{id}/members": {
            "get": _op(
                "An organization's members",
                "get_org_members",
                {"200": _json("MemberList", "The members."), **_errors(404)},
                params=[ORG_ID],
                tag="internal",
            )
        },
        "/healthz": {
            "get": _op("Liveness", "healthz", {"200": _json("Health", "Alive.")}, tag="ops")
        },
    }


def _schemas() -> JsonDict:
    user = _obj(["id", "email", "name"], id=STRING, email=STRING, name=STRING)
    tokens = _obj(
        ["access_token", "refresh_token", "token_type", "expires_in"],
        access_token={**STRING, "description": "HS256 JWT (iss auth-service, sub, exp)."},
        refresh_token=STRING,
        token_type={"type": "string", "const": "bearer"},
        expires_in={"type": "integer", "description": "Seconds."},
    )
    membership = _obj(["id", "name", "role"], id=STRING, name=STRING, role=ROLE)
    return {
        "Error": _obj(["error", "message"], error=STRING, message=STRING),
        "User": user,
        "Tokens": tokens,
        "Session": {"allOf": [tokens, _obj(["user"], user=_ref("User"))]},
        "SignUp": _obj(
            ["email", "password"],
            email={"type": "string", "format": "email"},
            password={"type": "string", "format": "password"},
            name={**STRING, "description": "Defaults to the email."},
        ),
        "SignIn": _obj(
            ["email", "password"],
            email={"type": "string", "format": "email"},
            password={"type": "string", "format": "password"},
        ),
        "RefreshToken": _obj(["refresh_token"], refresh_token=STRING),
        "LoggedOut": _obj(["logged_out"], logged_out={"type": "boolean"}),
        "Membership": membership,
        "Me": {
            "allOf": [
                _ref("User"),
                _obj(
                    ["org_id", "orgs"],
                    org_id={"type": ["string", "null"], "description": "The current org."},
                    orgs={"type": "array", "items": _ref("Membership")},
                ),
            ]
        },
        "SwitchOrg": _obj(["org_id"], org_id=STRING),
        "OrgCreate": _obj(["name"], name=STRING),
        "Org": _obj(["id", "name", "members"], id=STRING, name=STRING, members={"type": "integer"}),
        "OrgList": _obj(["orgs"], orgs={"type": "array", "items": _ref("Membership")}),
        "Member": {"allOf": [_ref("User"), _obj(["role"], role=ROLE)]},
        "MemberList": _obj(["members"], members={"type": "array", "items": _ref("Member")}),
        "InviteCreate": _obj(
            ["email"],
            email={"type": "string", "format": "email"},
            role={**GRANTABLE_ROLE, "default": "member"},
        ),
        "Invite": _obj(
            ["invite_token", "org_id", "role"],
            invite_token=STRING,
            org_id=STRING,
            role=GRANTABLE_ROLE,
        ),
        "InviteAccept": _obj(["token"], token={**STRING, "description": "The invite_token."}),
        "InviteAccepted": _obj(["org_id", "role"], org_id=STRING, role=GRANTABLE_ROLE),
        "MemberRemoved": _obj(["removed"], removed={**STRING, "description": "The user id."}),
        "RoleUpdate": _obj(["role"], role=GRANTABLE_ROLE),
        "RoleUpdated": _obj(["user_id", "role"], user_id=STRING, role=GRANTABLE_ROLE),
        "TokenValidation": _obj(
            ["valid", "claims"], valid={"type": "boolean", "const": True}, claims={"type": "object"}
        ),
        "Health": _obj(["status"], status={"type": "string", "const": "ok"}),
    }


def document() -> JsonDict:
    """A fresh copy of the document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "auth-service (aiogateway demo)",
            "version": "0.1.0",
            "description": "Users, sign-in tokens, organizations and invites, kept in memory.",
        },
        "tags": [
            {"name": "client", "description": "Sign-up, sign-in and the signed-in user."},
            {"name": "organizations", "description": "Organizations, members and invites."},
            {"name": "internal", "description": "For other services (service key)."},
            {"name": "ops", "description": "Probes."},
        ],
        "paths": _paths(),
        "components": {"schemas": _schemas()},
    }


DOCUMENT = document()
