"""Fuzzing: mutated checkpoints and indexes through every command (see ``fuzzkit``).

- :func:`test_fuzz` runs a fixed, derandomized set of cases (``SAFESHARD_FUZZ_EXAMPLES``,
  default 150): part of ``make test``, about ten seconds.
- :func:`test_fuzz_campaign` runs only when ``SAFESHARD_FUZZ_SECONDS`` is set (``make fuzz``
  sets 600): batches of cases, each from its own seed, until the time is spent, then
  prints how many cases it tried and each command's outcomes. The run's first seed is
  printed (``SAFESHARD_FUZZ_SEED`` sets it): the same seed replays the same batches.
- The tests below them check that each of the harness's detectors fires, and keep the
  minimal examples of the bugs the fuzzer found, each also as a direct test of the fix.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import safeshard
from helpers import fuzzkit
from helpers.fuzzkit import Base, Case, Obj, Raw, Tensor, cases, run_case
from safeshard import checkpoint as source
from safeshard import errors
from safeshard.checkpoint import read_manifest
from safeshard.format.index import check_shard_name
from safeshard.format.manifest import Manifest
from safeshard.io import copier as hashcopy
from safeshard.io.bytesrc import LocalFile
from safeshard.ops import sidecar
from safeshard.ops.writer import check_base

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@settings(
    FUZZ, max_examples=int(os.environ.get("SAFESHARD_FUZZ_EXAMPLES", "150")), derandomize=True
)
@given(cases())
def test_fuzz(case: Case) -> None:
    run_case(case)


BATCH = 100
"""Cases per seed in a campaign (fixed, so that a seed always replays the same cases)."""


@pytest.mark.skipif(
    not os.environ.get("SAFESHARD_FUZZ_SECONDS"), reason="a long fuzzing run: make fuzz"
)
def test_fuzz_campaign() -> None:
    """Batches of :data:`BATCH` cases until ``SAFESHARD_FUZZ_SECONDS`` are spent; a failing
    batch is shrunk, printed and counted, and the run goes on with the next seed."""
    budget = float(os.environ["SAFESHARD_FUZZ_SECONDS"])
    first = int(os.environ.get("SAFESHARD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nfuzz: {budget:.0f} s from seed {first} (SAFESHARD_FUZZ_SEED={first} replays it)")
    fuzzkit.STATS.clear()
    failures: list[str] = []
    start = time.monotonic()
    batch = 0
    try:
        while time.monotonic() - start < budget:
            s = first + batch

            @seed(s)
            @settings(FUZZ, max_examples=BATCH)
            @given(cases())
            def one_batch(case: Case) -> None:
                run_case(case)

            print(f"fuzz: batch {batch} (seed {s}), {fuzzkit.STATS['cases']} cases", flush=True)
            try:
                one_batch()
            except Exception as e:  # shrunk by Hypothesis; its notes hold the minimal case
                text = "".join(traceback.format_exception_only(e))
                failures.append(f"batch {batch} (SAFESHARD_FUZZ_SEED={s}):\n{text}")
                print(f"fuzz: batch {batch} FAILED\n{text}", flush=True)
            batch += 1
    finally:
        elapsed = time.monotonic() - start
        print(f"fuzz: {elapsed:.0f} s, {batch} batches from seed {first}")
        print(fuzzkit.summary())
    if failures:
        pytest.fail(f"{len(failures)} failing batches:\n" + "\n".join(failures))


# --------------------------------------------------------------------------- the detectors


def test_read_guard_flags_a_read_past_the_end(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    buf = memoryview(bytearray(4))
    with fuzzkit.ReadGuard() as guard, LocalFile.open(f) as src:
        assert src.readinto([buf], 6) == 4  # ends exactly at the end: fine
        assert not guard.violations
        src.readinto([buf], 8)
    assert len(guard.violations) == 1 and "at 8" in guard.violations[0]
    fd = os.open(f, os.O_RDONLY)
    out = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT)
    try:
        with fuzzkit.ReadGuard() as guard:
            os.preadv(fd, [buf], 9)
            os.copy_file_range(fd, out, 4, 7, 0)
    finally:
        os.close(fd)
        os.close(out)
    assert len(guard.violations) == 2
    with fuzzkit.ReadGuard() as guard:  # reading a whole file to its end is allowed
        hashcopy.hash_file(f)
    assert not guard.violations and guard.reads


def test_write_watch_flags_writes_outside(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "link").symlink_to(outside / "target")
    with fuzzkit.WriteWatch([inside]) as watch:
        (inside / "ok").write_bytes(b"x")
        os.replace(inside / "ok", inside / "ok2")
    assert not watch.violations
    with fuzzkit.WriteWatch([inside]) as watch:
        (outside / "a").write_bytes(b"x")
        (inside / "link").write_bytes(b"x")  # follows the symlink out
        os.replace(inside / "ok2", outside / "b")
        os.mkdir(outside / "d")
    assert len(watch.violations) == 4, watch.violations
    assert (outside / "target").exists()


def test_snapshot_sees_every_change(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    before = fuzzkit.snapshot(tmp_path, [])
    (tmp_path / "a").write_bytes(b"y")
    (tmp_path / "b").write_bytes(b"")
    assert len(fuzzkit.snapshot_diff(before, fuzzkit.snapshot(tmp_path, []))) == 2


def test_time_limit_stops_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    t0 = time.monotonic()
    with pytest.raises(fuzzkit.Hang), fuzzkit.time_limit(0.3, "reading a FIFO"):
        open(tmp_path / "fifo", "rb").close()  # blocks until a writer comes: never
    assert time.monotonic() - t0 < 5


SMALL = Case(
    Base(
        (
            Tensor("model.layers.0.mlp.down_proj.weight", "F16", (2, 2)),
            Tensor("lm_head.weight", "F32", (3,)),
        ),
        (("format", "pt"),),
        "sharded",
        shards=1,
    )
)


def test_run_case_passes_a_valid_checkpoint() -> None:
    assert set(run_case(SMALL).values()) == {"ok"}


def test_run_case_flags_an_exception_outside_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*a: object, **k: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(safeshard, "inspect", crash)
    with pytest.raises(fuzzkit.Finding, match="inspect: raised KeyError"):
        run_case(SMALL)


def test_run_case_flags_wrong_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = safeshard.load

    def wrong(*a: Any, **k: Any) -> dict[str, Any]:
        arrays = real(*a, **k)
        arrays["lm_head.weight"] = arrays["lm_head.weight"] + 1
        return arrays

    monkeypatch.setattr(safeshard, "load", wrong)
    with pytest.raises(fuzzkit.Finding, match="load: the tensors read differ"):
        run_case(SMALL)


def test_run_case_flags_a_write_beside_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    real = safeshard.split

    def scribble(src: Path, out: Path, **k: Any) -> object:
        (Path(src) / "scribble").write_text("x")
        return real(src, out, **k)

    monkeypatch.setattr(safeshard, "split", scribble)
    with pytest.raises(fuzzkit.Finding, match="split: wrote outside OUT_DIR") as e:
        run_case(SMALL)
    assert "created 'src/scribble'" in str(e.value)  # the snapshot sees it too


def test_run_case_flags_a_read_past_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    real = safeshard.inspect

    def overread(path: Path, **k: Any) -> object:
        shard = next(Path(path).glob("*.safetensors"))
        with LocalFile.open(shard) as f:
            f.readinto([memoryview(bytearray(16))], f.size - 8)
        return real(path, **k)

    monkeypatch.setattr(safeshard, "inspect", overread)
    with pytest.raises(fuzzkit.Finding, match="inspect: read past the end of a file"):
        run_case(SMALL)


def test_run_case_flags_success_on_an_invalid_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Case(SMALL.base, (("truncate", 0, 1, True),))
    monkeypatch.setattr(safeshard, "inspect", lambda *a, **k: None)
    with pytest.raises(fuzzkit.Finding, match="inspect: succeeded on an invalid checkpoint"):
        run_case(broken)


# --------------------------------------------------------------------------- found by fuzzing

T2 = (
    Tensor("model.layers.0.mlp.down_proj.weight", "F16", (2, 2)),
    Tensor("lm_head.weight", "F32", (3,)),
)
Q = "quantize_config.json"

FOUND = {
    # a JSON file nested deeper than Python's parser goes: RecursionError, not None
    "deep-config.json": Case(
        Base(T2, None, "single"), (("sidecar", "config.json", Raw.nested(3000)),)
    ),
    "deep-quantize_config.json": Case(
        Base(T2, None, "single"), (("sidecar", Q, Raw.nested(3000)),)
    ),
    "deep-manifest": Case(
        Base(T2, None, "split", shards=1), (("manifest", ("raw", Raw.nested(3000))),)
    ),
    # a weight_map value with a lone surrogate escape: UnicodeEncodeError in verify
    "surrogate-shard-name": Case(
        Base(T2, None, "sharded", shards=1), (("index", ("path", 0, "surrogate")),)
    ),
    # a weight_map value longer than any file name: a bare OSError(ENAMETOOLONG) everywhere
    "long-shard-name": Case(Base(T2, None, "sharded", shards=1), (("index", ("path", 0, "long")),)),
    # a FIFO where config.json or the manifest is expected: inspect/verify hung forever
    "fifo-config.json": Case(Base(T2, None, "single"), (("plant", "src", "config.json", "fifo"),)),
    "fifo-manifest": Case(
        Base(T2, None, "split", shards=1), (("plant", "src", "@manifest", "fifo"),)
    ),
    # a folder where the manifest is expected: a bare IsADirectoryError from split and merge
    "dir-manifest": Case(
        Base(T2, None, "split", shards=1), (("plant", "src", "@manifest", "dir"),)
    ),
    # a manifest whose recorded header holds a lone surrogate escape: UnicodeEncodeError
    "surrogate-manifest-header": Case(
        Base(T2, None, "split", shards=1), (("manifest", ("source_header", "surrogate")),)
    ),
    # quantize_config.json with a lone surrogate escape, rewritten by split: UnicodeEncodeError
    "surrogate-quantize_config": Case(
        Base(T2, None, "single"),
        (("sidecar", Q, Obj([("bits", 4), ("desc", "\ud800"), ("model_file_base_name", "x")])),),
    ),
    # shards with different __metadata__: verify --against compared each output shard with
    # the first source shard's metadata, not the metadata split keeps (the shared entries)
    "mixed-metadata": Case(Base(T2, (("format", "pt"),), "sharded", shards=1, mixed_metadata=True)),
    # a folder named like an index in OUT_DIR: split wrote its output beside it, and then no
    # command could read that output (it counted as a second checkpoint: ambiguous)
    "folder-named-like-an-index": Case(
        Base((), None, "single"), (("plant", "out", "x.safetensors.index.json", "dir"),)
    ),
    # a source file whose name is not UTF-8 (the byte 0xff): split recorded it in the
    # manifest and crashed writing it (UnicodeEncodeError), leaving a half-done OUT_DIR
    "file-name-not-utf8": Case(Base(T2, None, "single", base="m\udcff")),
    # split --name with a byte that is not UTF-8: the same crash in the journal
    "name-not-utf8": Case(Base(T2, None, "single"), name="m\udcff"),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_by_fuzzing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuzzkit, "COMMAND_TIMEOUT", 10.0)
    run_case(FOUND[name])


def test_a_folder_named_like_an_index_is_not_an_index(tmp_path: Path) -> None:
    fuzzkit.write_file(tmp_path / "model.safetensors", T2, None)
    (tmp_path / "x.safetensors.index.json").mkdir()
    os.mkfifo(tmp_path / "y.safetensors.index.json")
    assert source.find(tmp_path).file == tmp_path / "model.safetensors"


def test_names_that_are_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError, match="UTF-8"):
        check_base("m\udcff")
    src = fuzzkit.write_file(tmp_path / "m\udcff.safetensors", T2, None)
    safeshard.split(src, tmp_path / "out", max_shard_size=100, allow_oversize=True)
    man = read_manifest(tmp_path / "out", "model")
    assert man is not None and man.source is not None and man.source.file == src.name
    safeshard.merge(tmp_path / "out", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def test_read_json_file_refuses_deep_nesting_and_what_is_not_a_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000 + "]" * 5000)
    assert source.read_json_file(deep) is None
    os.mkfifo(tmp_path / "fifo.json")
    with fuzzkit.time_limit(5, "read_json_file on a FIFO"):
        assert source.read_json_file(tmp_path / "fifo.json") is None
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    assert source.read_json_file(tmp_path / "zero.json") is None


def test_manifest_refuses_deep_nesting_surrogates_and_what_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(errors.IndexFormatError):
        Manifest.from_json(b"[" * 5000 + b"]" * 5000)
    good = {
        "format": "safeshard-manifest",
        "version": 2,
        "base": "model",
        "cap": None,
        "shards": [],
        "tensor_digest": "xxh3_128",
        "tensors": {},
        "source": {"file": "a.safetensors", "size": 8, "header": "\ud800"},
    }
    with pytest.raises(errors.IndexFormatError, match="malformed manifest"):
        Manifest.from_json(json.dumps(good).encode())
    os.mkfifo(tmp_path / "model.safeshard.json")
    with fuzzkit.time_limit(5, "read_manifest on a FIFO"), pytest.raises(errors.IndexFormatError):
        read_manifest(tmp_path, "model")
    (tmp_path / "m.safeshard.json").mkdir()
    with pytest.raises(errors.IndexFormatError):
        read_manifest(tmp_path, "m")


def test_quantize_config_rewrite_survives_deep_nesting_and_surrogates() -> None:
    new, note = sidecar.rewrite_quantize_config(b"[" * 5000 + b"]" * 5000, "model")
    assert new is None and note is not None and "not valid JSON" in note
    new, _ = sidecar.rewrite_quantize_config(b'{"bits": 4, "desc": "\\ud800"}', "other")
    assert new is not None
    assert json.loads(new) == {"bits": 4, "desc": "\ud800", "model_file_base_name": "other"}


@pytest.mark.parametrize("value", ["\ud800.safetensors", "a" * 244 + ".safetensors"])
def test_shard_names_that_name_no_file_are_unsafe(value: str) -> None:
    with pytest.raises(errors.UnsafeIndexPathError):
        check_shard_name("model.safetensors.index.json", "t", value)
    assert check_shard_name("i", "t", "\udcff.safetensors")  # the byte 0xff: a real name
    assert check_shard_name("i", "t", "a" * 243 + ".safetensors")  # 255 bytes


def test_verify_against_a_source_with_mixed_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fuzzkit.write_file(src / "model-00001-of-00002.safetensors", T2[:1], None)
    fuzzkit.write_file(src / "model-00002-of-00002.safetensors", T2[1:], {"format": "pt"})
    fuzzkit.write_index(
        src / "model.safetensors.index.json",
        {
            T2[0].name: "model-00001-of-00002.safetensors",
            T2[1].name: "model-00002-of-00002.safetensors",
        },
        sum(t.nbytes for t in T2),
    )
    safeshard.split(src, tmp_path / "out")
    report = safeshard.verify(tmp_path / "out", against=src)
    assert report.ok, [f.to_json() for f in report.findings]


def test_fuzzkit_writes_what_the_official_reader_reads(tmp_path: Path) -> None:
    ts = (*T2, Tensor("x\x1b[31m", "F4", (3, 8)), Tensor("e", "BF16", (0,)))
    p = fuzzkit.write_file(
        tmp_path / "a.safetensors", ts, {"k": "v"}, order_seed=7, indent=True, pad=1
    )
    tensors, meta = fuzzkit.official(p)
    assert meta == {"k": "v"}
    assert tensors == {t.name: (t.dtype, t.shape, fuzzkit.tensor_bytes(t)) for t in ts}
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert (8 + n) % 8 == 0


def test_nothing_in_the_library_can_run_code_from_a_file() -> None:
    """SECURITY.md, claim 10: no unpickling, no evaluation, anywhere in the package."""
    import ast

    banned_modules = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "_pickle"}
    banned_calls = {"eval", "exec", "compile", "__import__"}
    found: list[str] = []
    for py in sorted(Path(safeshard.__file__).parent.rglob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{py.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                found += [where for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in banned_modules:
                    found.append(where)
            elif isinstance(node, ast.Call):
                f = node.func
                evaluates = isinstance(f, ast.Name) and f.id in banned_calls
                unpickles = (
                    isinstance(f, ast.Attribute)
                    and f.attr == "load"
                    and isinstance(f.value, ast.Name)
                    and f.value.id in ("torch", "numpy", "np", "pickle")
                )
                if evaluates or unpickles:
                    found.append(where)
    assert not found, found


# --------------------------------------------------------------------------- credential URLs


@pytest.fixture(scope="module")
def url_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("aiohttp")
    pytest.importorskip("upath")
    from helpers.faultproxy import FolderServer

    root = tmp_path_factory.mktemp("served")
    with FolderServer(root) as srv:
        yield root, srv.url


@pytest.mark.slow
def test_fuzz_credential_urls(url_server: tuple[Path, str]) -> None:
    """Mutated checkpoints served over HTTP, read through URLs that carry credentials
    (userinfo, percent-encoded userinfo, presigned and token query strings), through
    every command: no secret in stdout, stderr, any file written or any exception's
    text, and never exit 70 (``SAFESHARD_FUZZ_URL_EXAMPLES``, default 12)."""
    root, server = url_server

    @settings(
        FUZZ,
        max_examples=int(os.environ.get("SAFESHARD_FUZZ_URL_EXAMPLES", "12")),
        derandomize=True,
    )
    @given(cases().filter(fuzzkit.servable), st.sampled_from(fuzzkit.URL_FORMS))
    def one(case: Case, form: str) -> None:
        fuzzkit.run_url_case(case, root, server, form)

    one()


def test_credential_url_check_fires(url_server: tuple[Path, str]) -> None:
    """The leak detector sees a secret as written and percent-encoded."""
    assert fuzzkit.leaked("x pw-SECRET-b2 y") == ["pw-SECRET-b2"]
    assert fuzzkit.leaked(b"pw%2DSECRET%2Db2") == []  # quote() leaves '-': not an encoding
    assert fuzzkit.leaked("u5er-SECRET-a1") and not fuzzkit.leaked("nothing")
    for form in fuzzkit.URL_FORMS:
        assert fuzzkit.leaked(fuzzkit.credential_url(url_server[1], "a/b", form))


@pytest.mark.parametrize(
    "value",
    [
        "%2E%2E%2Foutside%2Fvictim.safetensors",
        "%252E%252E%252Fx.safetensors",
        "sub%5Cx.safetensors",
        "x%00.safetensors",
        "file:x.safetensors",
        "http%3Ax.safetensors",
    ],
)
def test_fuzz_reference_refuses_encoded_escapes(value: str) -> None:
    """The fuzzer's independent index rule and safeshard's agree on encoded names."""
    assert not fuzzkit._safe_weight_name(value)
    with pytest.raises(errors.UnsafeIndexPathError):
        check_shard_name("i", "t", value)
    assert fuzzkit._safe_weight_name("model%2D00001-of-00002.safetensors")
