"""Token and CURVE key loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hogwild import auth

HEADERS = {
    "right token": ("Bearer s3cret", True),
    "wrong token": ("Bearer nope", False),
    "no scheme": ("s3cret", False),
    "basic scheme": ("Basic s3cret", False),
    "missing": (None, False),
    "empty bearer": ("Bearer ", False),
}


@pytest.mark.parametrize(("header", "ok"), HEADERS.values(), ids=HEADERS.keys())
def test_bearer_check(header: str | None, ok: bool) -> None:
    assert auth.bearer_ok(header, "s3cret") is ok


def test_token_from_env_then_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert auth.load_token({"HOGWILD_TOKEN": "from-env", "HOGWILD_TOKEN_FILE": str(token_file)}) == "from-env"
    assert auth.load_token({"HOGWILD_TOKEN_FILE": str(token_file)}) == "from-file"
    assert auth.load_token({}) is None


@pytest.mark.parametrize("content", [None, ""], ids=["missing file", "empty file"])
def test_bad_token_file_is_a_clear_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(auth.CredentialError, match=re.escape(str(path))):
        auth.load_token({"HOGWILD_TOKEN_FILE": str(path)})


def test_curve_dir_gives_each_side_its_peer(tmp_path: Path) -> None:
    auth.write_curve_dir(tmp_path)
    server, client = auth.load_curve_keys("server", tmp_path), auth.load_curve_keys("client", tmp_path)
    assert server.peer_public == client.public and client.peer_public == server.public
    assert oct((tmp_path / "server.secret").stat().st_mode)[-3:] == "600"


def test_missing_curve_key_names_the_file(tmp_path: Path) -> None:
    auth.write_curve_dir(tmp_path)
    (tmp_path / "client.public").unlink()
    with pytest.raises(auth.CredentialError, match=r"client\.public"):
        auth.load_curve_keys("server", tmp_path)


REDACTIONS = {
    "token in the query": ("/train?token=s3cret", "/train?<redacted>"),
    "several parameters": ("/v1/models?a=1&token=x", "/v1/models?<redacted>"),
    "no query": ("/train/status", "/train/status"),
}


@pytest.mark.parametrize(("path", "logged"), REDACTIONS.values(), ids=REDACTIONS.keys())
def test_the_access_log_never_carries_a_query_string(path: str, logged: str) -> None:
    import logging

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "POST", path, "1.1", 401),
        None,
    )
    assert auth.RedactQueryFilter().filter(record)
    assert record.getMessage() == f'1.2.3.4:5 - "POST {logged} HTTP/1.1" 401'
