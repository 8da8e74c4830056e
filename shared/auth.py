"""Caller identity: bearer tokens (static keys stored hashed, or JWTs verified against a JWKS
file) mapped to scopes, and the principal of the RPC being served.

The auth interceptor authenticates every call that is not exempt (health by default),
checks the scope the called service needs and publishes the :class:`Principal` in a context
variable; handlers read it with :func:`current_principal` / :func:`caller_may`. With auth
off (nothing configured) there is no principal and every scope check passes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.config import AuthSettings
from shared.errors import PermissionDenied, Unauthenticated, abort_with
from shared.interceptors import WrappingInterceptor, metadata_value

log = logging.getLogger("agentmesh.auth")

SCOPE_AGENT_RUN = "agent:run"
SCOPE_AGENT_ADMIN = "agent:admin"
SCOPE_INFERENCE_CALL = "inference:call"
SCOPE_TOOLS_CALL = "tools:call"
ALL_SCOPES = frozenset({SCOPE_AGENT_RUN, SCOPE_AGENT_ADMIN, SCOPE_INFERENCE_CALL, SCOPE_TOOLS_CALL})

HEALTH_PREFIX = "/grpc.health.v1."
REFLECTION_PREFIX = "/grpc.reflection."


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``key:<name>`` for a static key, ``jwt:<subject>`` for a JWT."""

    name: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes


_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "agentmesh_principal", default=None
)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served; None when auth is off."""
    return _PRINCIPAL.get()


def principal_name() -> str:
    """The caller's name, "" when auth is off."""
    principal = _PRINCIPAL.get()
    return principal.name if principal else ""


def caller_may(scope: str) -> bool:
    """True when auth is off or the caller holds ``scope``."""
    principal = _PRINCIPAL.get()
    return principal is None or principal.has(scope)


def require_scope(scope: str, action: str) -> None:
    """PERMISSION_DENIED unless :func:`caller_may` ``scope``; ``action`` says what was tried."""
    if not caller_may(scope):
        raise PermissionDenied(
            f"{action} needs the scope {scope!r}",
            reason="MISSING_SCOPE",
            metadata={"scope": scope},
        )


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _PRINCIPAL.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _PRINCIPAL.reset(token)


def hash_token(token: str) -> str:
    """What a static key's ``sha256`` setting holds for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random static key (256 bits, URL-safe)."""
    return "am_" + secrets.token_urlsafe(32)


class _Jwks:
    """The verification keys of a JWKS file, re-read when the file changes (rotation)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime_ns = -1
        self._keys: dict[str, Any] = {}

    def keys(self) -> dict[str, Any]:
        import jwt

        mtime = self._path.stat().st_mtime_ns
        if mtime != self._mtime_ns:
            data = json.loads(self._path.read_text())
            keys: dict[str, Any] = {}
            for index, jwk in enumerate(data.get("keys", [])):
                key = jwt.PyJWK.from_dict(jwk)
                keys[str(jwk.get("kid") or index)] = key
            self._keys = keys
            self._mtime_ns = mtime
        return self._keys


class Authenticator:
    """Turns an ``authorization`` header into a Principal (or UNAUTHENTICATED)."""

    def __init__(self, settings: AuthSettings, legacy_token: str | None = None) -> None:
        self.settings = settings
        self._static: list[tuple[bytes, Principal]] = [
            (key.sha256.encode(), Principal(f"key:{key.name}", frozenset(key.scopes)))
            for key in settings.static_keys
        ]
        if legacy_token:
            self._static.append(
                (hash_token(legacy_token).encode(), Principal("key:default", ALL_SCOPES))
            )
        self._jwks = _Jwks(settings.jwks_file) if settings.jwks_file else None

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._jwks is not None

    def exempt(self, full_method: str) -> bool:
        if full_method.startswith(HEALTH_PREFIX):
            return self.settings.health_exempt
        if full_method.startswith(REFLECTION_PREFIX):
            return self.settings.reflection_exempt
        return False

    def required_scope(self, full_method: str) -> str | None:
        service = full_method.lstrip("/").split("/", 1)[0]
        if service.startswith(("grpc.health.", "grpc.reflection.")):
            return None  # not exempt: any authenticated caller may use them
        return self.settings.service_scopes.get(service, self.settings.default_scope)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing bearer token", reason="MISSING_TOKEN")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        digest = hash_token(token).encode()
        found: Principal | None = None
        for expected, principal in self._static:
            if hmac.compare_digest(digest, expected):
                found = principal
        if found is not None:
            return found
        if self._jwks is not None and token.count(".") == 2:
            verified = self._verify_jwt(token)
            if verified is not None:
                return verified
        raise Unauthenticated("invalid or expired bearer token", reason="INVALID_TOKEN")

    def _verify_jwt(self, token: str) -> Principal | None:
        import jwt

        assert self._jwks is not None
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
            keys = self._jwks.keys()
            kid = header.get("kid")
            candidates = [keys[kid]] if kid in keys else ([] if kid else list(keys.values()))
            for key in candidates:
                with contextlib.suppress(jwt.InvalidSignatureError):
                    claims = jwt.decode(
                        token,
                        key=key,
                        algorithms=s.jwt_algorithms,
                        audience=s.jwt_audience,
                        issuer=s.jwt_issuer,
                        leeway=s.jwt_leeway_s,
                        options={
                            "require": ["exp", s.jwt_subject_claim],
                            "verify_aud": s.jwt_audience is not None,
                        },
                    )
                    return Principal(
                        f"jwt:{claims[s.jwt_subject_claim]}", _scopes(claims.get(s.jwt_scope_claim))
                    )
        except (jwt.PyJWTError, ValueError, KeyError, OSError) as error:
            log.info("JWT refused: %s", type(error).__name__)
        return None


def _scopes(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, Iterable):
        return frozenset(str(v) for v in value)
    return frozenset()


class AuthInterceptor(WrappingInterceptor):
    """Authenticates, checks the service's scope, publishes the principal for the handler."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def exempt(self, method: str) -> bool:
        return self._auth.exempt(method)

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        try:
            principal = self._auth.authenticate(metadata_value(context, "authorization"))
        except Unauthenticated as error:
            await abort_with(context, error)
            raise  # not reached: abort raises
        scope = self._auth.required_scope(method)
        if scope is not None and not principal.has(scope):
            await abort_with(
                context,
                PermissionDenied(
                    f"the caller {principal.name!r} lacks the scope {scope!r}",
                    reason="MISSING_SCOPE",
                    metadata={"scope": scope},
                ),
            )
        token = bind_principal(principal)
        try:
            yield
        finally:
            reset_principal(token)
