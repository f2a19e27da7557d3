"""Storage errors said plainly (issue 16, items 7, 10, 13, 14 and 16).

Every storage error names the operation, the (redacted) URL and the object, and says
whether it was retried; a connection reset is not "check the endpoint URL", a 500 is not
the server's bare text; a missing destination bucket exits 3 naming the bucket; a refused
access key names the URL; a server error while listing a prefix names the prefix and the
operation; and no command exits 70 (a bug) on a storage error, a bad storage option or a
bad URL. The faults come from a real proxy on 127.0.0.1 in front of moto's S3 server
(``faultproxy.FaultProxy``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import write_st
from helpers.faultproxy import FaultProxy, Rule
from safeshard.cli import main

S3 = tuple[str, dict[str, Any]]

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as p:
        yield p


def flags(endpoint: str, key: str = "testing", secret: str = "testing") -> list[str]:
    """CLI storage options for ``endpoint``, with botocore's own retries off (so a fault
    is seen once and the test stays fast)."""
    out: list[str] = []
    for pair in (
        f"key={key}",
        f"secret={secret}",
        f"client_kwargs.endpoint_url={endpoint}",
        "client_kwargs.region_name=us-east-1",
        "skip_instance_cache=true",
        "config_kwargs.retries.total_max_attempts=1",
        "config_kwargs.retries.mode=standard",
    ):
        out += ["--storage-option", pair]
    return out


def model(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    write_st(folder / "model.safetensors", {"a.weight": ("F16", [8, 8]), "b.weight": ("F16", [8])})
    return folder


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def said(r: Result) -> str:
    return r.stdout + r.stderr


def assert_no_bug(r: Result) -> None:
    assert r.exit_code != 70, said(r)
    assert "Traceback" not in said(r) and "a bug in safeshard" not in said(r)


# --------------------------------------------------------------------------- item 10


def test_a_reset_upload_names_the_object_and_is_no_endpoint_problem(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    base, _ = s3
    proxy.add(Rule("PUT|POST", r"/out/model", "reset"))
    r = cli("split", str(model(tmp_path)), f"{base}/out", *flags(proxy.url))
    assert r.exit_code == 4, said(r)
    text = said(r)
    assert f"{base}/out/model.safetensors: cannot upload" in text
    assert "reset or closed by the server" in text
    assert "check the endpoint URL" not in text and "cannot reach" not in text
    assert "did not retry" in text or "attempts" in text


def test_a_500_on_upload_names_status_operation_and_object(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    base, _ = s3
    proxy.add(Rule("PUT|POST", r"/out/model", "500"))
    r = cli("split", str(model(tmp_path)), f"{base}/out", *flags(proxy.url))
    assert r.exit_code == 4, said(r)
    text = said(r)
    assert f"{base}/out/model.safetensors: cannot upload" in text
    assert "HTTP 500 InternalError" in text
    assert "did not retry" in text
    assert not text.strip().endswith("We encountered an internal error. Please try again.")


def test_a_ranged_read_that_keeps_failing_says_it_was_retried(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    import boto3

    base, opts = s3
    bucket = base[len("s3://") :]
    client = boto3.client(
        "s3",
        endpoint_url=opts["client_kwargs"]["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.upload_file(str(model(tmp_path) / "model.safetensors"), bucket, "src/model.safetensors")
    proxy.add(Rule("GET", r"/src/model\.safetensors$", "500"))
    r = cli(
        "merge", f"{base}/src/model.safetensors", str(tmp_path / "o.safetensors"), *flags(proxy.url)
    )
    assert r.exit_code == 4, said(r)
    text = said(r)
    assert f"{base}/src/model.safetensors: cannot read bytes" in text
    assert "failed after 4 attempts" in text and "HTTP 500" in text


# --------------------------------------------------------------------------- item 13


def test_a_missing_destination_bucket_exits_3_and_names_it(s3: S3, tmp_path: Path) -> None:
    _, opts = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    src = model(tmp_path)
    for args in (
        ["split", str(src), "s3://h16a-no-such-bucket/out"],
        ["merge", str(src), "s3://h16a-no-such-bucket/x.safetensors"],
    ):
        r = cli(*args, *flags(endpoint))
        assert r.exit_code == 3, said(r)
        assert "the bucket 'h16a-no-such-bucket' does not exist" in said(r)
        assert "s3://h16a-no-such-bucket/" in said(r)


# --------------------------------------------------------------------------- item 14


def test_a_refused_access_key_names_the_url(s3_auth_endpoint: str) -> None:
    url = "s3://h16a-bucket/model.safetensors"
    r = cli("inspect", url, *flags(s3_auth_endpoint, key="AKIAWRONG", secret="wrong-secret-xyz"))
    assert r.exit_code == 4, said(r)
    assert f"{url}: cannot look up" in said(r)
    assert "refused" in said(r) and "check the credentials" in said(r)
    assert "wrong-secret-xyz" not in said(r)


# --------------------------------------------------------------------------- item 16


def test_a_server_error_while_listing_names_the_prefix_and_operation(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    base, _ = s3
    # looking up the lock and journal objects lists too (s3fs); break the prefix listing
    proxy.add(Rule("GET", r"^(?!.*(safeshard\.lock|safeshard-journal)).*list-type=2", "500"))
    r = cli("split", str(model(tmp_path)), f"{base}/out", *flags(proxy.url))
    assert r.exit_code == 4, said(r)
    assert f"{base}/out/: cannot list the prefix" in said(r)
    assert "HTTP 500 InternalError" in said(r)


def test_a_server_error_while_listing_a_source_folder_names_it(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    base, opts = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    assert cli("split", str(model(tmp_path)), f"{base}/src", *flags(endpoint)).exit_code == 0
    proxy.add(Rule("GET", r"list-type=2", "500"))
    r = cli("inspect", f"{base}/src/", *flags(proxy.url))
    assert_no_bug(r)
    assert r.exit_code == 4, said(r)
    assert f"{base}/src" in said(r) and "HTTP 500" in said(r)
    assert "cannot list the prefix" in said(r) or "cannot look up" in said(r)


# --------------------------------------------------------------------------- item 7


def test_merge_on_an_unreachable_endpoint_is_no_bug(tmp_path: Path) -> None:
    r = cli(
        "merge",
        "s3://h16a-bucket/m/",
        str(tmp_path / "o.safetensors"),
        *flags("http://127.0.0.1:9"),
    )
    assert_no_bug(r)
    assert r.exit_code == 4
    assert "s3://h16a-bucket/m" in said(r) and "cannot reach the storage endpoint" in said(r)


def test_merge_on_a_truncated_index_body_is_no_bug(
    s3: S3, proxy: FaultProxy, tmp_path: Path
) -> None:
    base, opts = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    folder = model(tmp_path)
    write_st(folder / "x.safetensors", {"c.weight": ("F16", [4])})
    r = cli("split", str(folder / "model.safetensors"), f"{base}/sh", "-s", "250", *flags(endpoint))
    assert r.exit_code == 0, said(r)
    proxy.add(Rule("GET", r"index\.json", "truncate"))
    r = cli("merge", f"{base}/sh", str(tmp_path / "o.safetensors"), *flags(proxy.url))
    assert_no_bug(r)
    assert r.exit_code in (3, 4), said(r)
    assert f"{base}/sh" in said(r)


def test_merge_on_a_credential_url_is_no_bug_and_shows_no_secret(s3: S3, tmp_path: Path) -> None:
    _, opts = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    r = cli(
        "merge",
        "s3://AKIAH16A:very-secret-h16a@bucket/m/",
        str(tmp_path / "o.safetensors"),
        *flags(endpoint),
    )
    assert_no_bug(r)
    assert r.exit_code == 2, said(r)
    assert "very-secret-h16a" not in said(r) and "AKIAH16A" not in said(r)
    assert "credentials do not belong in an s3:// URL" in said(r)


BAD = {
    "unreachable endpoint": (
        "s3://h16a-bucket/m/",
        ["client_kwargs.endpoint_url=http://127.0.0.1:9"],
    ),
    "bad endpoint": ("s3://h16a-bucket/m/", ["client_kwargs.endpoint_url=notaurl"]),
    "unknown option": ("s3://h16a-bucket/m/", ["no_such_option=1"]),
    "no bucket": ("s3:///m/", []),
    "credentials in the URL": ("s3://K:very-secret-h16a@h16a-bucket/m/", []),
    "bad IPv6 URL": ("http://[::1/m.safetensors", []),
    "bad port": ("http://127.0.0.1:99999/m.safetensors", []),
    "unknown protocol": ("nosuchproto://x/m.safetensors", []),
}


def _commands(url: str, local: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", url],
        "inspect --json": ["inspect", "--json", url],
        "verify": ["verify", url],
        "split from": ["split", url, str(tmp / "out"), "--force"],
        "split to": ["split", str(local), url.rstrip("/") + "/out", "--force"],
        "merge from": ["merge", url, str(tmp / "o.safetensors"), "--force"],
        "merge to": ["merge", str(local), url.rstrip("/") + "/o.safetensors", "--force"],
        "diff": ["diff", url, str(local)],
    }


@pytest.mark.parametrize("case", sorted(BAD))
def test_no_command_exits_70_on_a_storage_error_bad_option_or_bad_url(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("aiohttp")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url, options = BAD[case]
    local = model(tmp_path)
    extra = [x for o in options for x in ("--storage-option", o)]
    if not any("endpoint_url" in o for o in options):
        extra += ["--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:9"]
    extra += ["--storage-option", "config_kwargs.retries.total_max_attempts=1"]
    for name, args in _commands(url, local, tmp_path).items():
        r = cli(*args, *extra)
        assert_no_bug(r)
        assert r.exit_code in (2, 3, 4), f"{name}: {said(r)}"
        assert "very-secret-h16a" not in said(r), name
        if "--json" not in args:
            assert said(r).startswith("error: "), f"{name}: {said(r)}"
        else:
            assert not r.stdout or json.loads(r.stdout)
