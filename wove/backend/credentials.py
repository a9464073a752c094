"""Tokens and per-run credentials for the callback server.

The master token guards the server's master URL and never leaves the submitting process through an executor. Each
run gets its own credential, ``HMAC-SHA256(secret, run_id)``: a worker holding one run's URL can post frames for that
run only, and a leaked URL stops working once the run is closed.
"""

from __future__ import annotations

import base64
import hmac
import secrets

__all__ = ["new_secret", "new_token", "run_credential", "same_secret", "verify_run_credential"]

#: Bytes of randomness in a generated master token (``secrets.token_urlsafe`` gives 43 URL-safe characters).
TOKEN_BYTES = 32

#: Bytes in the key that signs run credentials.
SECRET_BYTES = 32


def new_token() -> str:
    """Return a fresh URL-safe master token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_secret() -> bytes:
    """Return a fresh key for signing run credentials."""
    return secrets.token_bytes(SECRET_BYTES)


def run_credential(secret: bytes, run_id: str) -> str:
    """Return the URL-safe credential that authorises frames for ``run_id``."""
    digest = hmac.digest(secret, run_id.encode("utf-8", "surrogatepass"), "sha256")  # OpenSSL's one-shot HMAC
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_run_credential(secret: bytes, run_id: str, credential: str) -> bool:
    """Check ``credential`` for ``run_id`` in constant time."""
    return same_secret(run_credential(secret, run_id), credential)


def same_secret(expected: str, given: str) -> bool:
    """Compare two secrets in constant time; any text is accepted (non-ASCII simply never matches)."""
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass"))
