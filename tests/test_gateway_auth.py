"""gateway.auth and gateway.keys: API keys, JWTs (real RSA/EC keys, a JWKS file, pyjwt-signed tokens), client-cert
rules, admin keys and authorization, as tables. The only file read is the JWKS; the token cache runs on a fake clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import gateway.auth
from gateway.auth import ANONYMOUS, AuthConfigError, Authenticator, AuthError, Principal
from gateway.config import ALL_METHODS, AdminKey, ApiKey, AuthConfig, ClientCertRule, JwtConfig, Rate
from gateway.keys import digest, new_key

ISSUER, AUDIENCE = "https://issuer.example", "tfgate"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_A, KEY_B, ADMIN = "tfg_key-a", "tfg_key-b", "tfg_admin"
RATE = Rate(per_second=5, burst=10)
INVALID = 'Bearer realm="tfgate", error="invalid_token"'
MISSING = "missing credentials: send Authorization: Bearer <key or token> or x-api-key"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def write_jwks(path: Path, *extra: dict[str, Any]) -> Path:
    keys = [dict(RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True), kid="rsa1"),
            dict(ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), kid="ec1"), *extra]
    path.write_text(json.dumps({"keys": keys}))
    return path


def jwt_config(tmp_path: Path, **changes: Any) -> JwtConfig:
    fields: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": write_jwks(tmp_path / "jwks.json"),
                              "rate": RATE, **changes}
    return JwtConfig(**fields)


def authenticator(tmp_path: Path, clock: Callable[[], float] = time.time, **changes: Any) -> Authenticator:
    fields: dict[str, Any] = {
        "api_keys": (ApiKey("alpha", digest(KEY_A), models=("mnist*",), methods=("predict", "metadata"), rate=RATE,
                            model_rates={"mnist": Rate(1, 1)}),
                     ApiKey("beta", digest(KEY_B))),
        "jwt": jwt_config(tmp_path),
        "client_certs": (ClientCertRule("CN=batch-job", models=("resnet",), methods=("predict",)),),
        "admin_keys": (AdminKey("ops", digest(ADMIN)),),
        **changes,
    }
    return Authenticator.from_config(AuthConfig(**fields), clock)


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {k: v for k, v in {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
                              "models": ["mnist", "res*"], **changes}.items() if v is not None}


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa1", **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm=alg, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key() -> str:
    """The algorithm-confusion forgery: HMAC keyed with the (public) RSA key's PEM. pyjwt refuses to make one."""
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa1'}).encode())}." \
                    f"{b64(json.dumps(claims()).encode())}"
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


def refused(auth: Authenticator, headers: dict[str, str], subject: str | None = None) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(headers, subject)
    return info.value


# --- API keys -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [bearer(KEY_A), {"x-api-key": KEY_A}, {"authorization": f"bearer  {KEY_A} "}])
def test_api_key_forms(tmp_path: Path, headers: dict[str, str]) -> None:
    principal = authenticator(tmp_path).authenticate(headers, None)
    assert principal == Principal("alpha", "api_key", ("mnist*",), ("predict", "metadata"), RATE, {"mnist": Rate(1, 1)},
                                  "alpha")


def test_authorization_header_wins_over_x_api_key(tmp_path: Path) -> None:
    assert authenticator(tmp_path).authenticate({**bearer(KEY_B), "x-api-key": KEY_A}, None).name == "beta"


@pytest.mark.parametrize("headers", [bearer("tfg_wrong"), {"x-api-key": "tfg_wrong"}, bearer(""), {"x-api-key": ""}])
def test_wrong_key_is_one_message_whether_or_not_keys_exist(tmp_path: Path, headers: dict[str, str]) -> None:
    for auth in (authenticator(tmp_path), authenticator(tmp_path, api_keys=(), jwt=None)):
        error = refused(auth, headers)
        assert (error.status, error.message, error.challenge) == (401, "invalid credentials", INVALID)


def test_wrong_key_is_never_downgraded(tmp_path: Path) -> None:
    assert refused(authenticator(tmp_path), bearer("tfg_wrong"), "CN=batch-job").message == "invalid credentials"
    assert refused(authenticator(tmp_path, required=False), bearer("tfg_wrong")).status == 401


def test_every_digest_is_compared_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    auth = authenticator(tmp_path)
    monkeypatch.setattr(gateway.auth.hmac, "compare_digest", counting)
    assert auth.authenticate(bearer(KEY_A), None).name == "alpha"  # the first key matches: the second is still compared
    assert [b.hex() for _, b in calls] == [digest(KEY_A), digest(KEY_B)]
    assert all(a == hashlib.sha256(KEY_A.encode()).digest() for a, _ in calls)


# --- JWT ------------------------------------------------------------------------------------------------------------

def test_valid_tokens(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    exp = int(time.time()) + 600
    rsa_principal = auth.authenticate(bearer(token(exp=exp)), None)
    assert rsa_principal == Principal("alice", "jwt", ("mnist", "res*"), ALL_METHODS, RATE, {}, "jwt", float(exp))
    ec_principal = auth.authenticate(bearer(token(EC_KEY, "ES256", "ec1", sub="bob", models="a b*")), None)
    assert (ec_principal.name, ec_principal.models, ec_principal.metrics_name) == ("bob", ("a", "b*"), "jwt")


def test_token_without_sub_or_models(tmp_path: Path) -> None:
    principal = authenticator(tmp_path).authenticate(bearer(token(sub=None, models=None)), None)
    assert (principal.name, principal.models, principal.allows("mnist", "predict")) == ("jwt", (), False)


def test_models_claim_is_configurable(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, jwt=jwt_config(tmp_path, models_claim="scope"))
    assert auth.authenticate(bearer(token(scope="m1 m2")), None).models == ("m1", "m2")


def test_leeway_accepts_a_just_expired_token(tmp_path: Path) -> None:
    assert authenticator(tmp_path).authenticate(bearer(token(exp=int(time.time()) - 5)), None).name == "alice"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: token(exp=int(time.time()) - 120), "token expired"),
    (lambda: token(nbf=int(time.time()) + 120), "token not yet valid"),
    (lambda: token(aud="someone-else"), "wrong audience"),
    (lambda: token(iss="https://evil.example"), "wrong issuer"),
    (lambda: token(exp=None), "missing required claim"),
    (lambda: token(aud=None), "missing required claim"),
    (lambda: token(None, "none"), "unsupported algorithm"),
    (hs256_with_public_key, "unsupported algorithm"),
    (lambda: token(EC_KEY, "ES256", "rsa1"), "unsupported algorithm"),  # the key decides the algorithm
    (lambda: token(RSA_KEY, "RS512"), "unsupported algorithm"),  # not configured
    (lambda: token(OTHER_RSA_KEY), "bad signature"),
    (lambda: token(kid="nope"), "unknown signing key"),
    (lambda: token(kid=None), "unknown signing key"),
    (lambda: token(models=7), "the models claim must be a list of strings or a space-separated string"),
    (lambda: "a.e30.abc", "malformed token"),
    (lambda: b64(b"not json") + ".e30.abc", "malformed token"),
])
def test_bad_tokens(tmp_path: Path, make: Callable[[], str], reason: str) -> None:
    bad = make()
    error = refused(authenticator(tmp_path), bearer(bad))
    assert (error.status, error.message, error.challenge) == (401, f"invalid credentials: {reason}", INVALID)
    assert bad not in str(error)


def test_verified_tokens_are_cached_until_exp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    auth = authenticator(tmp_path, clock)
    decoded: list[str] = []
    real_decode = jwt.decode

    def counting(tok: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(tok)
        return real_decode(tok, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    exp = int(clock.now) + 600
    tok = token(exp=exp)
    first = auth.authenticate(bearer(tok), None)
    assert auth.authenticate({"x-api-key": tok}, None) is first
    assert (len(decoded), auth.cache_size) == (1, 1)
    clock.now = exp + 1  # past exp on our clock (pyjwt's real clock still accepts it): verified again, not cached
    assert auth.authenticate(bearer(tok), None) == first
    assert (len(decoded), auth.cache_size) == (2, 0)


def test_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.auth, "_CACHE_SIZE", 3)
    auth = authenticator(tmp_path)
    for n in range(5):
        auth.authenticate(bearer(token(sub=f"user{n}")), None)
    assert auth.cache_size == 3


# --- client certificates, anonymous, missing ------------------------------------------------------------------------

def test_client_cert_rule(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    principal = auth.authenticate({}, "CN=batch-job")
    assert principal == Principal("CN=batch-job", "client_cert", ("resnet",), ("predict",), None, {}, "CN=batch-job")
    assert auth.authenticate(bearer(KEY_B), "CN=batch-job").name == "beta"  # a header credential wins
    assert refused(auth, {}, "CN=someone-else").message == MISSING


def test_headers_alone_decide_unless_a_certificate_still_could(tmp_path: Path) -> None:
    """What the gRPC edge asks before it reads a call's message, when the client certificate is not known yet."""
    with_certs, without_certs = authenticator(tmp_path), authenticator(tmp_path, client_certs=())
    assert with_certs.authenticate_by_headers(bearer(KEY_B)).name == "beta"  # a header credential decides alone
    assert with_certs.authenticate_by_headers({}) is None  # a certificate rule might still name the caller
    for auth in (with_certs, without_certs):
        with pytest.raises(AuthError, match="invalid credentials"):
            auth.authenticate_by_headers(bearer("tfg_wrong"))
    with pytest.raises(AuthError, match=MISSING):
        without_certs.authenticate_by_headers({})


@pytest.mark.parametrize("headers", [{}, {"authorization": "Basic dXNlcjpwdw=="}])
def test_missing_credentials(tmp_path: Path, headers: dict[str, str]) -> None:
    error = refused(authenticator(tmp_path), headers)
    assert (error.status, error.message, error.challenge) == (401, MISSING, 'Bearer realm="tfgate"')
    assert authenticator(tmp_path, required=False).authenticate(headers, None) is ANONYMOUS


def test_anonymous_principal() -> None:
    assert (ANONYMOUS.name, ANONYMOUS.kind, ANONYMOUS.metrics_name, ANONYMOUS.rate) == (
        "anonymous", "anonymous", "anonymous", None)
    assert all(ANONYMOUS.allows("any-model", method) for method in ALL_METHODS)


NOTHING = "auth.required is true but no api_keys, jwt or client_certs are configured"


@pytest.mark.parametrize(("config", "reason"), [
    (AuthConfig(), NOTHING),
    (AuthConfig(admin_keys=(AdminKey("ops", digest(ADMIN)),)), NOTHING),  # admin keys open only the admin API
    (AuthConfig(required=False), None),
    (AuthConfig(api_keys=(ApiKey("beta", digest(KEY_B)),)), None),
    (AuthConfig(client_certs=(ClientCertRule("CN=x"),)), None),
])
def test_misconfigured(config: AuthConfig, reason: str | None) -> None:
    assert Authenticator.from_config(config).misconfigured == reason


def test_misconfigured_with_jwt_only(tmp_path: Path) -> None:
    assert Authenticator.from_config(AuthConfig(jwt=jwt_config(tmp_path))).misconfigured is None


# --- authorization --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("models", "methods", "model", "method", "allowed"), [
    (("*",), ALL_METHODS, "anything", "status", True),
    (("mnist*",), ("predict",), "mnist-v2", "predict", True),
    (("mnist*",), ("predict",), "mnist-v2", "classify", False),
    (("mnist*",), ALL_METHODS, "fashion-mnist", "predict", False),
    (("mnist?",), ALL_METHODS, "mnist1", "predict", True),
    (("mnist?",), ALL_METHODS, "mnist12", "predict", False),
    (("Mnist",), ALL_METHODS, "mnist", "predict", False),  # case-sensitive on every platform
    (("a", "b[0-9]"), ALL_METHODS, "b7", "regress", True),
    ((), ALL_METHODS, "a", "predict", False),
])
def test_authorize(models: tuple[str, ...], methods: tuple[str, ...], model: str, method: str, allowed: bool) -> None:
    auth = Authenticator.from_config(AuthConfig(required=False))
    principal = Principal("p", "api_key", models, methods, None, {}, "p")
    if allowed:
        auth.authorize(principal, model, method)
        return
    with pytest.raises(AuthError) as info:
        auth.authorize(principal, model, method)
    assert (info.value.status, info.value.message, info.value.challenge) == (
        403, f"principal 'p' may not call {method} on model '{model}'", None)


# --- admin keys -----------------------------------------------------------------------------------------------------

def test_admin_keys(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    assert auth.authenticate_admin(bearer(ADMIN)) == "ops"
    assert auth.authenticate_admin({"x-api-key": ADMIN}) == "ops"
    for wrong in (bearer(KEY_A), bearer(token()), {"x-api-key": "tfg_wrong"}):  # data-plane credentials are not admin
        with pytest.raises(AuthError) as info:
            auth.authenticate_admin(wrong)
        assert (info.value.status, info.value.message) == (401, "invalid credentials")
    with pytest.raises(AuthError) as info:
        auth.authenticate_admin({})
    assert (info.value.status, info.value.message) == (401, MISSING)
    with pytest.raises(AuthError):
        auth.authenticate({"x-api-key": ADMIN}, None)  # and an admin key is not a data-plane key


# --- config errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("algorithms", "message"), [
    (("RS256", "HS256"), "auth.jwt.algorithms: 'HS256' is not accepted"),
    (("none",), "auth.jwt.algorithms: 'none' is not accepted"),
    ((), "auth.jwt.algorithms: at least one algorithm is needed"),
])
def test_symmetric_or_no_algorithms_are_refused(tmp_path: Path, algorithms: tuple[str, ...], message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        Authenticator.from_config(AuthConfig(jwt=jwt_config(tmp_path, algorithms=algorithms)))


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read: No such file or directory"),
    ("not json", "not a JWK Set with usable keys"),
    (json.dumps({"keys": []}), "not a JWK Set with usable keys"),
    (json.dumps({"keys": [{"kty": "RSA", "kid": "k", "n": "SECRETISH", "e": "AQAB"}]}), "not a JWK Set with usable keys"),
    (json.dumps({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0LXNlY3JldA"}]}), "a key for HS256 (kid 'k'): only asymmetric keys are accepted"),
    (json.dumps({"keys": [RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)]}), "a key has no kid"),
])
def test_bad_jwks_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "bad-jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuthConfigError) as info:
        Authenticator.from_config(AuthConfig(jwt=jwt_config(tmp_path, jwks_file=path)))
    assert str(info.value).startswith(f"auth.jwt.jwks_file {path}: ") and message in str(info.value)
    assert "SECRETISH" not in str(info.value) and "c2VjcmV0" not in str(info.value)


def test_bad_digest_is_refused_without_quoting_it() -> None:
    with pytest.raises(AuthConfigError, match="^auth.api_keys beta: sha256 must be 64 hex digits$"):
        Authenticator.from_config(AuthConfig(api_keys=(ApiKey("beta", "zz" * 32),)))


# --- gateway.keys ---------------------------------------------------------------------------------------------------

def test_new_key_line_authenticates(tmp_path: Path) -> None:
    key, line = new_key("batch.job-1")
    assert key.startswith("tfg_") and len(key) == 4 + 43
    [entry] = yaml.safe_load(line)
    assert entry == {"name": "batch.job-1", "sha256": digest(key), "models": ["*"]}
    assert key not in line
    auth = Authenticator.from_config(AuthConfig(api_keys=(ApiKey(entry["name"], entry["sha256"]),)))
    assert auth.authenticate({"x-api-key": key}, None).name == "batch.job-1"


def test_new_keys_are_fresh_and_names_stay_strings() -> None:
    assert new_key("a")[0] != new_key("a")[0]
    for name in ("yes", "null", "1e3", "007"):
        assert yaml.safe_load(new_key(name)[1])[0]["name"] == name


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "has space", "quote\"", "a/b", "naïve", "x\n"])
def test_new_key_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        new_key(name)


def test_digest() -> None:
    assert digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
