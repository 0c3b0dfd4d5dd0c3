"""Minting API keys: a fresh random key for the client, and the config line that stores only its sha256.

Guarantees: keys carry 256 bits from `secrets` behind a recognisable "tfg_" prefix (so leaked keys are easy to scan
for); the config line holds the digest, never the key, in the same form `gateway.auth` compares against. The name is
quoted in the line, so names such as "yes", "null" or "1e3" stay strings when YAML reads them.
"""

from __future__ import annotations

import hashlib
import re
import secrets

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def raw_digest(key: str) -> bytes:
    """The sha256 of a key, as gateway.auth compares it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def digest(key: str) -> str:
    """The lowercase hex sha256 that `api_keys[].sha256` and `admin_keys[].sha256` hold."""
    return raw_digest(key).hex()


def new_key(name: str) -> tuple[str, str]:
    """(the key, to hand to the client once; the YAML list item for `auth.api_keys`)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r} must match [A-Za-z0-9][A-Za-z0-9._-]*")
    key = "tfg_" + secrets.token_urlsafe(32)
    return key, f'- {{name: "{name}", sha256: "{digest(key)}", models: ["*"]}}'
