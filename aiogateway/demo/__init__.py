"""Sample services and the local dev stack: what ``make dev`` and ``make demo`` run.

Not product code: a minimal auth-service (:mod:`.auth_service`, its OpenAPI
document in :mod:`.auth_openapi`), one echo service for billing/chat/tpl/user
(:mod:`.echo_service`), the stack launcher (:mod:`.devstack`) and the scripted
walkthrough (:mod:`.walkthrough`).
"""

__all__: list[str] = []
