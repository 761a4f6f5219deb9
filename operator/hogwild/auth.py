"""Credentials: the bearer token of weight-changing HTTP routes, and the CURVE keys of the control channel.

- Token: `Authorization: Bearer <token>`; read from HOGWILD_TOKEN or the file named by HOGWILD_TOKEN_FILE.
- CURVE (ZMQ's elliptic-curve auth + encryption) on the worker's tcp control port. Keys are Z85 text files in
  one directory (HOGWILD_CURVE_DIR): `server.public`, `server.secret` (worker), `client.public`,
  `client.secret` (operator). The worker accepts only the client public key found there. In a pod the
  worker's mount leaves out `client.secret`, and the operator's leaves out `server.secret`.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hogwild import defaults

ENV_CURVE_DIR = "HOGWILD_CURVE_DIR"
CURVE_FILES = ("server.public", "server.secret", "client.public", "client.secret")


class CredentialError(RuntimeError):
    """A credential is missing or unreadable; the message says which and where it was looked for."""


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def load_token(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    token = env.get(defaults.ENV_TOKEN, "").strip()
    if token:
        return token
    path = env.get(defaults.ENV_TOKEN_FILE, "").strip()
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise CredentialError(f"cannot read the /train token from {path}: {err}") from None
        if not token:
            raise CredentialError(f"the /train token file {path} is empty")
        return token
    return None


def bearer_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an Authorization header against the token."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded keys. A side holds its own keypair and the peer's public key."""

    public: bytes
    secret: bytes
    peer_public: bytes


def generate_keypair() -> tuple[bytes, bytes]:
    """(public, secret), Z85-encoded."""
    import zmq

    return zmq.curve_keypair()


def write_curve_dir(directory: str | os.PathLike[str]) -> Path:
    """Generate a server and a client keypair into `directory` (local mode and tests)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_public, server_secret = generate_keypair()
    client_public, client_secret = generate_keypair()
    for name, key in zip(
        CURVE_FILES, (server_public, server_secret, client_public, client_secret), strict=True
    ):
        path = out / name
        path.write_bytes(key)
        path.chmod(0o600)
    return out


def _read_key(directory: Path, name: str) -> bytes:
    try:
        key = (directory / name).read_bytes().strip()
    except OSError as err:
        raise CredentialError(f"CURVE key {name} not found in {directory}: {err}") from None
    if len(key) != 40:
        raise CredentialError(f"CURVE key {directory / name} must be 40 Z85 characters, has {len(key)}")
    return key


def load_curve_keys(role: str, directory: str | os.PathLike[str] | None = None) -> CurveKeys:
    """Keys for `role` "server" (the worker) or "client" (the operator)."""
    if role not in {"server", "client"}:
        raise ValueError(f"role must be server or client, got {role!r}")
    where = directory or os.environ.get(ENV_CURVE_DIR)
    if not where:
        raise CredentialError(f"no CURVE key directory: set {ENV_CURVE_DIR}")
    path = Path(where)
    peer = "client" if role == "server" else "server"
    return CurveKeys(
        public=_read_key(path, f"{role}.public"),
        secret=_read_key(path, f"{role}.secret"),
        peer_public=_read_key(path, f"{peer}.public"),
    )


# ---- logs carry no credentials -----------------------------------------------------------------------------
def redact_query(path: str) -> str:
    """A request path fit for a log: its query string (it may carry a token, rightly refused) left out."""
    head, sep, _ = path.partition("?")
    return head + "?<redacted>" if sep else path


class RedactQueryFilter(logging.Filter):
    """On the HTTP access log: every path argument loses its query string before it is formatted.

    uvicorn logs `'%s - "%s %s HTTP/%s" %d'` with the path and query as the third argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query(a) if isinstance(a, str) and a.startswith("/") else a for a in record.args
            )
        return True


def redact_access_log(logger_name: str = "uvicorn.access") -> None:
    """Install RedactQueryFilter on the access logger (once; the plugin may load more than once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactQueryFilter) for f in logger.filters):
        logger.addFilter(RedactQueryFilter())
