"""Who is calling, may they call this, and at what rate: the checks every request passes before it is routed.

Order, so that an unauthenticated client learns nothing: authenticate (401) → authorize the model and method (403)
→ (the edge routes: 404 for a model with no route) → rate limit (429). Rate-limit headers (RateLimit-Limit/Remaining/Reset, and Retry-After on a refusal) come back on
every answer a bucket applied to, so clients can pace themselves before they are refused.

The principal's client certificate subject comes from the TLS connection (already verified against `tls.client_ca`
by the handshake); parsing it is cached per certificate, since one connection carries many requests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping

from cryptography import x509

from gateway import errors
from gateway.auth import Authenticator, AuthError, Principal
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import Decision, RateLimiter


class Guard:
    def __init__(self, limiter: RateLimiter, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock

    def identify(self, authenticator: Authenticator, headers: Mapping[str, str], certificate: bytes | None,
                 model: str, method: str) -> Principal:
        """The caller (by its HTTP headers or gRPC metadata, or its verified DER client certificate), granted
        `method` on `model`; a 401 or 403 GatewayError otherwise."""
        subject = None if certificate is None else certificate_subject(certificate)
        try:
            principal = authenticator.authenticate(headers, subject)
            authenticator.authorize(principal, model, method)
        except AuthError as error:
            raise self._refused(error) from None
        return principal

    def screen(self, authenticator: Authenticator, headers: Mapping[str, str]) -> None:
        """Refuse, with a 401 GatewayError, a caller whose headers alone fail authentication (Authenticator.
        authenticate_by_headers), before its request is read; `identify` checks everything once it is."""
        try:
            authenticator.authenticate_by_headers(headers)
        except AuthError as error:
            raise self._refused(error) from None

    def _refused(self, error: AuthError) -> errors.GatewayError:
        self._metrics.auth_failed(status=error.status)
        challenge = (("www-authenticate", error.challenge),) if error.challenge else ()
        kind = errors.Unauthorized if error.status == 401 else errors.Forbidden
        return kind(error.message, challenge)

    def limit(self, principal: Principal, model: str, route: str) -> tuple[tuple[str, str], ...]:
        """Take this request from the caller's buckets: the rate-limit headers for the answer, or a 429 GatewayError.
        `route` (the route's model pattern) labels the metrics: bounded by the config, unlike model names."""
        decision = self._limiter.check(f"{principal.kind}:{principal.name}", principal.rate, principal.model_rates,
                                       model, self._clock())
        if decision.scope:  # some bucket applied
            self._metrics.rate_limited(principal=principal.metrics_name, route=route, allowed=decision.allowed)
        headers = rate_limit_headers(decision)
        if not decision.allowed:
            raise errors.TooManyRequests(f"Rate limit exceeded ({decision.scope}); retry in {decision.retry_after_s} s",
                                         (("retry-after", str(decision.retry_after_s)), *headers))
        return headers


def rate_limit_headers(decision: Decision) -> tuple[tuple[str, str], ...]:
    if not decision.scope:
        return ()
    return (("ratelimit-limit", str(decision.limit)), ("ratelimit-remaining", str(decision.remaining)),
            ("ratelimit-reset", str(decision.reset_s)))


@functools.lru_cache(maxsize=1024)
def certificate_subject(der: bytes) -> str:
    """The RFC 4514 subject of a DER certificate, as `auth.client_certs[].subject` is written: "CN=batch-job"."""
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()
