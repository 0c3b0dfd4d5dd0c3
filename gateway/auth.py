"""Who is calling, and may they call this: API keys, JWTs and client-certificate rules become one `Principal`.

How it works: a credential comes from `authorization: Bearer <token>` (which wins) or `x-api-key: <key>`. Its sha256
is compared with every configured API-key digest; if none matches and JWT is configured and the credential has the
JWT shape, pyjwt verifies it with the JWKS key named by its `kid` (signature, exp/nbf/iat, iss, aud; exp, iss and aud
required). Verified tokens are cached by their sha256 until their exp, so a busy client costs one signature check per
token. With no header credential, a client-certificate subject may match a rule; with nothing at all the caller is
anonymous when auth is not required, else refused. `from_config` reads the JWKS file once; everything else is pure.

Guarantees:
- digests are compared in constant time (`hmac.compare_digest`), against every configured digest, with no early exit;
- a wrong key and a bad token get the same 401 "invalid credentials"; a JWT failure may add which check failed
  (expired, wrong audience, ...), which says nothing about keys; a presented credential that fails is never
  downgraded to anonymous or to the client certificate;
- only asymmetric algorithms are accepted: a config listing `none` or HS* (or a JWKS holding a symmetric key) is
  refused with `AuthConfigError`, and a token's `alg` must be both configured and the algorithm of its key, which
  closes the HMAC-with-public-key confusion;
- keys and tokens never appear in messages; the 403 names only the caller, the method and the model.
"""

from __future__ import annotations

import hmac
import re
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal, TypeVar

import jwt

from gateway.config import ALL_METHODS, JWT_ALGORITHMS, AuthConfig, JwtConfig, Rate
from gateway.keys import raw_digest

Kind = Literal["api_key", "jwt", "client_cert", "anonymous"]
_T = TypeVar("_T")

_ASYMMETRIC = frozenset(JWT_ALGORITHMS)  # see gateway.config: never HMAC or "none"
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # an unsigned token has no third part
_CACHE_SIZE = 10_000
_NO_RATES: Mapping[str, Rate] = types.MappingProxyType({})
_MISSING = "missing credentials: send Authorization: Bearer <key or token> or x-api-key"
_CHALLENGE = 'Bearer realm="tfgate"'
_INVALID_CHALLENGE = 'Bearer realm="tfgate", error="invalid_token"'
# pyjwt's failures, most specific first, as fixed reasons: its own messages may quote parts of the token.
_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.MissingRequiredClaimError, "missing required claim"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "unsupported algorithm"),
)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # key/rule name; for JWT the token's `sub`; "anonymous" when auth is off
    kind: Kind
    models: tuple[str, ...]  # fnmatch globs
    methods: tuple[str, ...]
    rate: Rate | None
    model_rates: Mapping[str, Rate]
    metrics_name: str  # bounded cardinality: every JWT principal is "jwt", however many subjects there are
    expires_at: float | None = None  # JWT exp

    def allows(self, model: str, method: str) -> bool:
        return method in self.methods and ("*" in self.models or any(fnmatchcase(model, glob) for glob in self.models))


ANONYMOUS = Principal("anonymous", "anonymous", ("*",), ALL_METHODS, None, _NO_RATES, "anonymous")


class AuthError(Exception):
    """A refused request: 401 with a `WWW-Authenticate` challenge, or 403 without one."""

    def __init__(self, status: int, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.challenge = challenge


class AuthConfigError(Exception):
    """An auth config the gateway cannot enforce (a bad JWKS file, a symmetric algorithm); names the file or key."""


def _invalid(reason: str = "") -> AuthError:
    return AuthError(401, f"invalid credentials: {reason}" if reason else "invalid credentials", _INVALID_CHALLENGE)


def _credential(headers: Mapping[str, str]) -> str | None:
    """The presented key or token; an Authorization scheme other than Bearer is not ours and counts as absent."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    key = headers.get("x-api-key")
    return None if key is None else key.strip()


def _match(digest: bytes, entries: Iterable[tuple[bytes, _T]]) -> _T | None:
    """The entry whose digest equals `digest`: every digest is compared, so timing says nothing about position."""
    found: _T | None = None
    for candidate, entry in entries:
        if hmac.compare_digest(digest, candidate) and found is None:
            found = entry
    return found


def _digest_bytes(where: str, hexdigest: str) -> bytes:
    try:
        raw = bytes.fromhex(hexdigest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise AuthConfigError(f"{where}: sha256 must be 64 hex digits")
    return raw


def _load_jwks(config: JwtConfig) -> dict[str, jwt.PyJWK]:
    """The JWKS file's keys by kid; every key must be asymmetric and named, so no token can pick a key by accident."""
    if not config.algorithms:
        raise AuthConfigError("auth.jwt.algorithms: at least one algorithm is needed")
    for alg in config.algorithms:
        if alg not in _ASYMMETRIC:
            raise AuthConfigError(f"auth.jwt.algorithms: {alg!r} is not accepted: only asymmetric algorithms "
                                  f"({', '.join(sorted(_ASYMMETRIC))})")
    path = config.jwks_file
    try:
        keyset = jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AuthConfigError(f"auth.jwt.jwks_file {path}: cannot read: {e.strerror or type(e).__name__}") from None
    except (ValueError, AttributeError, jwt.PyJWTError):  # pyjwt's messages may quote key material
        raise AuthConfigError(f"auth.jwt.jwks_file {path}: not a JWK Set with usable keys") from None
    keys: dict[str, jwt.PyJWK] = {}
    for key in keyset:
        if key.algorithm_name not in _ASYMMETRIC:
            raise AuthConfigError(f"auth.jwt.jwks_file {path}: a key for {key.algorithm_name} (kid {key.key_id!r}): "
                                  "only asymmetric keys are accepted")
        if not isinstance(key.key_id, str) or not key.key_id:
            raise AuthConfigError(f"auth.jwt.jwks_file {path}: a key has no kid (tokens pick keys by kid)")
        keys.setdefault(key.key_id, key)
    return keys


class Authenticator:
    """One config's credentials; rebuilt on reload, so the token cache never outlives the keys that filled it."""

    def __init__(self, auth: AuthConfig, jwks: Mapping[str, jwt.PyJWK], clock: Callable[[], float]) -> None:
        self._required = auth.required
        self._jwt = auth.jwt
        self._jwks = jwks
        self._clock = clock
        self._api_keys = tuple(
            (_digest_bytes(f"auth.api_keys {key.name}", key.sha256),
             Principal(key.name, "api_key", key.models, key.methods, key.rate, key.model_rates, key.name))
            for key in auth.api_keys)
        self._admin_keys = tuple(
            (_digest_bytes(f"auth.admin_keys {key.name}", key.sha256), key.name) for key in auth.admin_keys)
        self._certs: dict[str, Principal] = {}
        for rule in auth.client_certs:
            self._certs.setdefault(rule.subject, Principal(
                rule.subject, "client_cert", rule.models, rule.methods, rule.rate, rule.model_rates, rule.subject))
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()

    @classmethod
    def from_config(cls, auth: AuthConfig, clock: Callable[[], float] = time.time) -> Authenticator:
        return cls(auth, _load_jwks(auth.jwt) if auth.jwt is not None else {}, clock)

    @property
    def misconfigured(self) -> str | None:
        """Why every request will get 401, when auth is required but nothing could ever authenticate."""
        if self._required and not (self._api_keys or self._jwt is not None or self._certs):
            return "auth.required is true but no api_keys, jwt or client_certs are configured"
        return None

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def authenticate(self, headers: Mapping[str, str], client_cert_subject: str | None) -> Principal:
        credential = _credential(headers)
        if credential is not None:
            return self._verify(credential)
        if client_cert_subject is not None and client_cert_subject in self._certs:
            return self._certs[client_cert_subject]
        if not self._required:
            return ANONYMOUS
        raise AuthError(401, _MISSING, _CHALLENGE)

    def authenticate_by_headers(self, headers: Mapping[str, str]) -> Principal | None:
        """The caller by its headers alone, before its certificate is known: None when a certificate could still
        decide (no credential sent, and auth.client_certs names subjects)."""
        if self._certs and _credential(headers) is None:
            return None
        return self.authenticate(headers, None)

    def authorize(self, principal: Principal, model: str, method: str) -> None:
        if not principal.allows(model, method):
            raise AuthError(403, f"principal '{principal.name}' may not call {method} on model '{model}'")

    def authenticate_admin(self, headers: Mapping[str, str]) -> str:
        """The admin key's name. Admin keys are their own set: a data-plane key or token never opens the admin API."""
        credential = _credential(headers)
        if credential is None:
            raise AuthError(401, _MISSING, _CHALLENGE)
        name = _match(raw_digest(credential), self._admin_keys)
        if name is None:
            raise _invalid()
        return name

    def _verify(self, credential: str) -> Principal:
        if not credential:
            raise _invalid()
        digest = raw_digest(credential)
        principal = _match(digest, self._api_keys)
        if principal is not None:
            return principal
        if self._jwt is None or not _JWT_SHAPE.fullmatch(credential):
            raise _invalid()
        cached = self._cache.get(digest)
        if cached is not None and cached.expires_at is not None and self._clock() < cached.expires_at:
            self._cache.move_to_end(digest)
            return cached
        self._cache.pop(digest, None)
        principal = self._verify_jwt(credential, self._jwt)
        if principal.expires_at is not None and self._clock() < principal.expires_at:
            self._cache[digest] = principal
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _verify_jwt(self, token: str, config: JwtConfig) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            alg, kid = header.get("alg"), header.get("kid")
            if alg not in config.algorithms:
                raise _invalid("unsupported algorithm")
            key = self._jwks.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise _invalid("unknown signing key")
            if alg != key.algorithm_name:  # the key decides the algorithm, not the token
                raise _invalid("unsupported algorithm")
            claims = jwt.decode(token, key.key, algorithms=[alg], issuer=config.issuer, audience=config.audience,
                                leeway=config.leeway_s, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as e:
            reason = next((reason for kind, reason in _JWT_REASONS if isinstance(e, kind)), "malformed token")
            raise _invalid(reason) from None
        models = claims.get(config.models_claim, ())
        if isinstance(models, str):
            models = models.split()
        if not isinstance(models, (list, tuple)) or not all(isinstance(glob, str) for glob in models):
            raise _invalid(f"the {config.models_claim} claim must be a list of strings or a space-separated string")
        try:
            expires_at = float(claims["exp"])
        except OverflowError:  # pyjwt takes any integer (10**400); as for its own "Infinity", a malformed token
            raise _invalid("malformed token") from None
        subject = claims.get("sub")
        return Principal(subject or "jwt", "jwt", tuple(models), ALL_METHODS, config.rate, _NO_RATES, "jwt",
                         expires_at=expires_at)
