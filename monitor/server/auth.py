"""Bearer tokens and tenants: who may call, and which tenant each handler reads and writes.

A token maps to one tenant, or to "*" (every tenant). With tokens configured every
endpoint but /healthz and /readyz needs one (and /metrics, unless `metrics_public`).
Handlers never read `?tenant=` themselves; they ask this module:

- `list_tenant` for lists (executions, agents, findings, the stream): a bound token reads
  its own tenant, and naming another is 403 (that says nothing about what exists there);
- `named_tenant` where an id is named (an execution, a breaker): a bound token that names
  another tenant gets the same 404 as an id that does not exist, so existence never leaks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from monitor.events import DEFAULT_TENANT

ALL_TENANTS = "*"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Probes: a kubelet or a load balancer has no token."""
REALM = 'Bearer realm="execwatch"'


@dataclass(frozen=True, slots=True)
class Scope:
    """What one request may see: one tenant, or every tenant (`tenant` None)."""

    tenant: str | None

    @property
    def every_tenant(self) -> bool:
        return self.tenant is None


EVERY = Scope(None)
SCOPE = web.RequestKey("scope", Scope)


class Tokens:
    """The configured tokens, matched in constant time.

    The presented token is hashed and its digest compared with every configured digest,
    always all of them, with hmac.compare_digest: how long a lookup takes says nothing
    about how much of a guess was right, or which token it was close to.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._known = [
            (_digest(token), EVERY if tenant == ALL_TENANTS else Scope(tenant))
            for token, tenant in tokens.items()
        ]

    def __bool__(self) -> bool:
        return bool(self._known)

    def match(self, presented: str) -> Scope | None:
        digest = _digest(presented)
        found: Scope | None = None
        for known, scope in self._known:
            if hmac.compare_digest(digest, known) and found is None:
                found = scope
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme has no case)."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Refuse = Callable[[int, str, dict[str, str]], web.StreamResponse]
Count = Callable[[str], None]


def make_middleware(
    tokens: Mapping[str, str], metrics_public: bool, refuse: Refuse, count: Count
) -> Middleware:
    """The middleware that sets every request's SCOPE, or answers 401 (counted).

    `refuse(status, message, headers)` builds the error answer; `count(reason)` counts a
    refusal (`missing_token`, `invalid_token`)."""
    known = Tokens(tokens)
    open_paths = OPEN_PATHS | ({"/metrics"} if metrics_public else set())

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not known or request.path in open_paths:
            request[SCOPE] = EVERY
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            count("missing_token")
            return refuse(
                401,
                "this endpoint needs a bearer token: send 'Authorization: Bearer TOKEN' "
                "with a token from [auth.tokens]",
                {"WWW-Authenticate": REALM},
            )
        presented = bearer(header)
        scope = None if presented is None else known.match(presented)
        if scope is None:
            count("invalid_token")
            why = (
                "the Authorization header is not 'Bearer TOKEN'"
                if presented is None
                else "the bearer token is not one of [auth.tokens]"
            )
            return refuse(401, why, {"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
        request[SCOPE] = scope
        return await handler(request)

    return authenticate


def list_tenant(request: web.Request) -> str | None:
    """The tenant a list reads (None: every tenant). A bound token reads its own;
    an all-tenants token reads `?tenant=` if given, else every tenant."""
    scope, asked = request[SCOPE], request.query.get("tenant")
    if scope.tenant is None:
        return asked
    if asked is not None and asked != scope.tenant:
        raise ForeignTenant(scope.tenant, asked)
    return scope.tenant


def named_tenant(request: web.Request) -> str | None:
    """The tenant an execution or agent named in the path is looked up in: a bound
    token's own, an all-tenants token's `?tenant=` (default `default`). None when a bound
    token names another tenant: the caller answers the same 404 as for an unknown id."""
    scope, asked = request[SCOPE], request.query.get("tenant")
    if scope.tenant is None:
        return asked or DEFAULT_TENANT
    if asked is not None and asked != scope.tenant:
        return None
    return scope.tenant


def write_tenant(request: web.Request) -> str | None:
    """The tenant events are bound to (None: they may name any, `default` if they don't)."""
    return request[SCOPE].tenant


class ForeignTenant(web.HTTPForbidden):
    """A bound token asked a list of another tenant."""

    def __init__(self, own: str, asked: str) -> None:
        super().__init__(
            text=f"this token reads only tenant {own!r}, not {asked[:80]!r}; leave 'tenant' "
            f"out or set it to {own!r}"
        )
