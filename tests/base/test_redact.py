"""Credentials in URLs are never shown (issue 16, item 1).

URL userinfo (``http://user:pw@host``, ``s3://KEY:SECRET@bucket``) and credential query
parameters (presigned ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``,
``sig``, ``token``, ...) are redacted in every message, JSON field, exception
``str``/``repr``, manifest and index; ``--storage-option`` secrets never appear either.
"""

from __future__ import annotations

import json
import pickle
import string
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

import safeshard
from conftest import write_st
from safeshard import errors
from safeshard.cli import emit_json, main
from safeshard.cli._text import safe
from safeshard.redact import (
    SECRET_PARAMS,
    redact,
    secrets_of_options,
    secrets_of_url,
    secrets_shown_never,
)

USER, PW = "h16a-user-Q7", "h16a-pass-Z9"
SIG, CRED, TOK = "h16a-sig-K3", "h16a-cred-M4", "h16a-token-P5"
ALL = (USER, PW, SIG, CRED, TOK)


def clean(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return not any(s in text for s in ALL)


# --------------------------------------------------------------------------- the function


@pytest.mark.parametrize(
    "text, shown",
    [
        ("http://u:pw@host/a", "http://***@host/a"),
        ("s3://KEY:SECRET@bucket/m.safetensors: no", "s3://***@bucket/m.safetensors: no"),
        ("https://tok@h:8/x?y=1", "https://***@h:8/x?y=1"),
        (
            "https://h/x.safetensors?X-Amz-Algorithm=A&X-Amz-Credential=c%2Fd&X-Amz-Signature=s",
            "https://h/x.safetensors?X-Amz-Algorithm=A&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("https://h/x?x-amz-security-token=t&a=1", "https://h/x?x-amz-security-token=***&a=1"),
        ("see https://h/x?sig=abc&se=2030: bad", "see https://h/x?sig=***&se=2030: bad"),
        ("https://h/x?token=abc#frag", "https://h/x?token=***#frag"),
        ("'https://u:p@h/x', 'b'", "'https://***@h/x', 'b'"),
        ('Invalid bucket name "KEY:SECRET@bucket": no', 'Invalid bucket name "***@bucket": no'),
        (
            "model.safetensors: tensor 'a.weight' is bad",
            "model.safetensors: tensor 'a.weight' is bad",
        ),
        ("user@example.com wrote", "user@example.com wrote"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_every_listed_parameter_is_masked_in_any_case() -> None:
    for name in SECRET_PARAMS:
        for spelled in (name, name.upper()):
            assert redact(f"https://h/p?{spelled}=v4lue-x&a=1") == f"https://h/p?{spelled}=***&a=1"


SECRET = st.text(string.ascii_letters + string.digits + "-_.~", min_size=6, max_size=20).map(
    lambda s: "Sx" + s
)


@settings(max_examples=200, deadline=None)
@given(
    user=SECRET,
    pw=SECRET,
    param=st.sampled_from(sorted(SECRET_PARAMS)),
    value=SECRET,
    before=st.text(" abc:'\"(\n", max_size=5),
    after=st.text(" abc:'\")\n,", max_size=5),
    scheme=st.sampled_from(["http", "https", "s3", "gs", "az", "hf", "memory", "s3a"]),
)
def test_no_secret_survives(
    user: str, pw: str, param: str, value: str, before: str, after: str, scheme: str
) -> None:
    for url in (
        f"{scheme}://{user}:{pw}@host/p/m.safetensors",
        f"{scheme}://{user}@host/p/m.safetensors",
        f"{scheme}://host/p/m.safetensors?a=1&{param}={value}",
        f"{scheme}://{user}:{pw}@host/p/m.safetensors?{param}={value}",
        f"{user}:{pw}@bucket/p",
    ):
        shown = redact(f"{before}{url}{after}")
        for s in (user, pw, value):
            if s in url:
                assert s not in shown, (url, shown)


def test_registered_secrets_are_masked_literally_only_while_registered() -> None:
    text = "the client said: bucket h16a-pass-Z9 is odd"
    with secrets_shown_never([PW, "ab"]):  # a secret under 3 characters is not searched
        assert redact(text) == "the client said: bucket *** is odd"
        assert redact("ab cd") == "ab cd"
    assert redact(text) == text


def test_secrets_of_urls_and_options() -> None:
    url = f"https://{USER}:{PW}@h/x?X-Amz-Signature={SIG}&X-Amz-Credential={CRED}&a=keep"
    found = secrets_of_url(url)
    assert {USER, PW, SIG, CRED} <= set(found) and "keep" not in found
    opts = {
        "key": USER,
        "secret": PW,
        "client_kwargs": {"endpoint_url": "http://h:9"},
        "token": TOK,
    }
    assert {USER, PW, TOK} <= set(secrets_of_options(opts))
    assert "http://h:9" not in secrets_of_options(opts)


# --------------------------------------------------------------------------- errors


def _error_classes() -> Iterator[type[errors.SafeshardError]]:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.SafeshardError):
            yield cls


def _make(cls: type[errors.SafeshardError], text: str) -> errors.SafeshardError:
    if issubclass(cls, errors.HeaderError):
        return cls(f"https://{USER}:{PW}@h/m.safetensors", text)
    if issubclass(cls, errors.StorageError):
        return cls(text, filename=f"s3://{USER}:{PW}@b/x")
    return cls(text)


@pytest.mark.parametrize("cls", list(_error_classes()), ids=lambda c: c.__name__)
def test_no_error_class_shows_a_credential(cls: type[errors.SafeshardError]) -> None:
    text = f"https://{USER}:{PW}@h/m.safetensors?X-Amz-Signature={SIG}&token={TOK}: failed"
    e = _make(cls, text)
    for shown in (str(e), repr(e), "".join(traceback.format_exception(e)), *map(str, e.args)):
        assert clean(shown), shown
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is cls and str(again) == str(e) and clean(repr(again))
    for attr in ("filename", "path", "problem", "strerror"):
        assert clean(str(getattr(e, attr, "")))


def test_a_translated_client_error_chains_nothing_that_holds_a_secret() -> None:
    pytest.importorskip("s3fs")
    with pytest.raises(errors.SafeshardError) as info:
        safeshard.inspect(
            f"s3://{USER}:{PW}@bucket/m.safetensors",
            storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}},
        )
    e = info.value
    assert clean("".join(traceback.format_exception(e))), traceback.format_exception(e)
    assert "***@bucket" in str(e)


# --------------------------------------------------------------------------- the CLI


def test_cli_text_gate_redacts() -> None:
    """Every string the CLI prints (messages, tables, progress labels) passes safe()."""
    assert safe(f"https://{USER}:{PW}@h/x") == "https://***@h/x"
    assert safe(f"merge s3://{USER}:{PW}@b/m\x1b") == "merge s3://***@b/m\\x1b"


def test_emit_json_redacts_every_string(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"path": f"https://{USER}:{PW}@h/x", "list": [f"s3://{USER}:{PW}@b"], "n": 1})
    out = json.loads(capsys.readouterr().out)
    assert out == {"path": "https://***@h/x", "list": ["s3://***@b"], "n": 1}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    pytest.importorskip("aiohttp")
    pytest.importorskip("upath")
    from helpers.faultproxy import FolderServer

    root = tmp_path / "srv"
    write_st(
        root / "ck" / "model.safetensors",
        {"model.layers.0.w": ("F16", [8, 8]), "model.layers.1.w": ("F16", [8, 8])},
        {"format": "pt"},
    )
    with FolderServer(root) as srv:
        yield root, srv.url


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file())


def test_an_http_url_with_a_password_is_never_shown(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    root, server = served
    host = server.partition("://")[2]
    url = f"http://{USER}:{PW}@{host}/ck/model.safetensors"
    outs: list[Result] = []
    for args in (
        ["inspect", url],
        ["inspect", "--json", url],
        ["verify", "--json", url],
        ["split", url, str(tmp_path / "out"), "-s", "300", "--json"],
        ["merge", f"{url[: -len('model.safetensors')]}nothere.safetensors", str(tmp_path / "x")],
    ):
        r = _run(*args)
        outs.append(r)
        assert clean(r.stdout + r.stderr), (args, r.stdout + r.stderr)
        assert r.exit_code != 70, r.output
    assert outs[1].exit_code == 0
    assert json.loads(outs[1].stdout)["path"] == f"http://***@{host}/ck/model.safetensors"
    assert outs[3].exit_code == 0, outs[3].output
    split_out = tmp_path / "out"
    r = _run("merge", str(split_out), str(tmp_path / "m.safetensors"), "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.safetensors").read_bytes() == (
        root / "ck" / "model.safetensors"
    ).read_bytes()
    for p in _files(tmp_path):  # shards, index, manifest, merged file: nothing holds a secret
        assert clean(p.read_bytes()), p
    r = _run("merge", url, str(tmp_path / "m2.safetensors"), "--json")
    assert r.exit_code == 0 and clean(r.stdout + r.stderr), r.output
    assert json.loads(r.stdout)["source"] == f"http://***@{host}/ck/model.safetensors"


def test_a_presigned_url_is_never_shown(served: tuple[Path, str]) -> None:
    _, server = served
    url = (
        f"{server}/ck/model.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={CRED}&X-Amz-Signature={SIG}&X-Amz-Security-Token={TOK}"
    )
    for args in (["inspect", url], ["inspect", "--json", url], ["verify", url]):
        r = _run(*args)
        assert r.exit_code in (0, 1, 2, 3, 4), r.output
        assert clean(r.stdout + r.stderr), r.stdout + r.stderr
        assert "X-Amz-Signature=***" in r.stdout + r.stderr


def test_library_results_and_errors_hold_no_credential(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    _, server = served
    host = server.partition("://")[2]
    url = f"http://{USER}:{PW}@{host}/ck/model.safetensors"
    report = safeshard.inspect(url)
    assert clean(json.dumps(report.to_json(), default=str))
    result = safeshard.merge(url, tmp_path / "m.safetensors")
    assert clean(json.dumps(result.to_json(), default=str))
    with pytest.raises(errors.SafeshardError) as info:
        safeshard.inspect(f"http://{USER}:{PW}@{host}/ck/nothere.safetensors")
    assert clean("".join(traceback.format_exception(info.value)))


# --------------------------------------------------------------------------- storage options


def test_storage_option_secrets_never_leak(s3_auth_endpoint: str, tmp_path: Path) -> None:
    """Refused credentials passed as --storage-option: the error names the URL, never the
    secret or the key; the same through the library."""
    args: list[Any] = []
    for pair in (
        f"key={USER}",
        f"secret={PW}",
        f"token={TOK}",
        f"client_kwargs.endpoint_url={s3_auth_endpoint}",
        "client_kwargs.region_name=us-east-1",
        "skip_instance_cache=true",
    ):
        args += ["--storage-option", pair]
    write_st(tmp_path / "m" / "model.safetensors", {"a": ("F16", [4])})
    for cmd in (
        ["inspect", "s3://h16a-bucket/m.safetensors"],
        ["inspect", "--json", "s3://h16a-bucket/m.safetensors"],
        ["split", str(tmp_path / "m"), "s3://h16a-bucket/out"],
        ["merge", "s3://h16a-bucket/m/", str(tmp_path / "o.safetensors")],
    ):
        r = _run(*cmd, *args)
        assert r.exit_code == 4, r.output
        assert clean(r.stdout + r.stderr), r.stdout + r.stderr
        assert "s3://h16a-bucket/" in r.stderr
    opts = {
        "key": USER,
        "secret": PW,
        "client_kwargs": {"endpoint_url": s3_auth_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    with pytest.raises(errors.ReadError) as info:
        safeshard.inspect("s3://h16a-bucket/m.safetensors", storage_options=opts)
    assert clean("".join(traceback.format_exception(info.value)))
