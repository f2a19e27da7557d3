"""hashcopy: exact copies, one digest per tensor, header digest, SHA-256 off the copy's path."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from safeshard.errors import ReadError
from safeshard.io import copier as hashcopy
from safeshard.io.bytesrc import ByteSource, Extent, LocalFile, LocalSink
from safeshard.io.copier import Hashes, Sha256Follower, Sha256Pool, copy_pieces, plan_runs
from safeshard.io.localfs import CHUNK


def xxh(b: bytes) -> str:
    return xxhash.xxh3_128(b).hexdigest()


def copy(
    tmp_path: Path, data: bytes, cuts: list[tuple[int, int]], *, remote: bool = False
) -> tuple[Hashes, bytes]:
    """Copy ``cuts`` of ``data`` after a header: local to local (zero-copy), or through
    a source without a descriptor (the buffered path a remote source takes)."""
    srcf = tmp_path / "s.bin"
    srcf.write_bytes(data)
    dst_path = tmp_path / "d.bin"
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        local = LocalFile.open(srcf)
        with local:
            src: ByteSource = NoDescriptor(local) if remote else local
            pieces = [Extent(src, a, b - a, f"t{i}") for i, (a, b) in enumerate(cuts)]
            got = copy_pieces(LocalSink(dst, str(dst_path)), b"HEADER!!", pieces)
    finally:
        os.close(dst)
    return got, dst_path.read_bytes()


class NoDescriptor(ByteSource):
    """A local file seen as a source without a descriptor, like a remote object."""

    def __init__(self, inner: LocalFile) -> None:
        self.inner, self.name, self.size = inner, inner.name, inner.size

    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        return self.inner.readinto(buffers, offset)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=0, max_size=40),
    st.integers(1, 97),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_copy_is_exact_and_every_tensor_digest_right(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    chunk: int,
    rnd: object,
    remote: bool,
) -> None:
    """Pieces in any order, contiguous or not, zero-size ones, runs cut at any size."""
    tmp_path = tmp_path_factory.mktemp("c")
    data = os.urandom(sum(sizes) + 10)
    bounds, pos = [], 5
    for n in sizes:
        bounds.append((pos, pos + n))
        pos += n
    if len(bounds) > 2:
        rnd.shuffle(bounds)  # type: ignore[attr-defined]  # some runs break, some join
    old = hashcopy.COPY_CHUNK
    hashcopy.COPY_CHUNK = chunk  # many runs through the bounded queue
    try:
        got, written = copy(tmp_path, data, bounds, remote=remote)
    finally:
        hashcopy.COPY_CHUNK = old
    assert written == b"HEADER!!" + b"".join(data[a:b] for a, b in bounds)
    assert got.tensors == {f"t{i}": xxh(data[a:b]) for i, (a, b) in enumerate(bounds)}
    assert got.header == xxh(b"HEADER!!")


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50)), max_size=30), st.integers(1, 64))
def test_runs_cover_the_pieces_exactly_and_respect_the_chunk(
    decl: list[tuple[int, int]], chunk: int
) -> None:
    sources = [NoDescriptor(LocalFile(-1, f"f{k}", 10**6)) for k in range(3)]
    pieces, pos = [], {0: 0, 1: 0, 2: 0}
    for i, (k, n) in enumerate(decl):
        pieces.append(Extent(sources[k], pos[k], n, f"t{i}"))
        pos[k] += n + (i % 3 == 0)  # some gaps
    runs = plan_runs(pieces, chunk)
    fed: dict[int, int] = {}
    for r in runs:
        assert 0 < r.nbytes <= chunk
        assert sum(n for _, _, n in r.parts) == r.nbytes
        at = r.offset
        for i, start, n in r.parts:
            assert pieces[i].source is r.source and pieces[i].offset + start == at
            assert fed.get(i, 0) == start  # each piece fed in order, once
            fed[i] = start + n
            at += n
    assert fed == {i: p.nbytes for i, p in enumerate(pieces) if p.nbytes}


def test_many_tiny_tensors_cost_few_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = os.copy_file_range

    def counted(*args: int) -> int:
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counted)
    sizes = [0, 4] * 5000
    bounds, pos = [], 0
    for n in sizes:
        bounds.append((pos, pos + n))
        pos += n
    got, _ = copy(tmp_path, os.urandom(pos), bounds)
    assert len(got.tensors) == len(bounds)
    assert calls["n"] <= 2, "contiguous tensors are copied as one run"


def test_a_source_read_error_is_a_read_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    monkeypatch.setattr(os, "preadv", broken)
    with pytest.raises(ReadError, match=r"s\.bin") as e:
        copy(tmp_path, b"x" * 1000, [(0, 1000)])
    assert e.value.errno == errno.EIO


def test_a_source_that_shrinks_while_copied_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises((ReadError, OSError), match="ended"):
        copy(tmp_path, b"x" * 100, [(0, 50), (50, 200)])


def test_sha256_follower_hashes_the_written_file_and_may_finish_later(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 123)
    pool = Sha256Pool(1)
    followers = []
    for i in range(3):  # more files than the pool's single slot: they queue, then finish
        path = tmp_path / f"f{i}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        f = Sha256Follower(fd, len(data), pool, name=str(path))
        for at in range(0, len(data), 1_000_003):
            os.pwrite(fd, data[at : at + 1_000_003], at)
            f.advance(min(len(data), at + 1_000_003))
        os.close(fd)  # the follower reads its own duplicate
        followers.append(f)
    for f in followers:
        assert f.result() == hashlib.sha256(data).hexdigest()


def test_a_cancelled_follower_stops(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    f = Sha256Follower(fd, 100, Sha256Pool(1), name="f")
    os.close(fd)
    f.cancel()
    with pytest.raises(ReadError, match="cancelled"):
        f.result()


def test_digest_file_agrees_with_what_the_copy_computed(tmp_path: Path) -> None:
    from safeshard.format.header import TensorSpec, build_header

    specs = [
        TensorSpec("a", "U8", (5,), 5),
        TensorSpec("b", "U8", (0,), 0),
        TensorSpec("c", "U8", (9,), 9),
    ]
    header = build_header(specs)
    body = os.urandom(14)
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + body)
    with LocalFile.open(path) as src:
        got = hashcopy.digest_file(src)
    assert got.header == xxh(header)
    assert got.tensors == {"a": xxh(body[:5]), "b": xxh(b""), "c": xxh(body[5:])}


@pytest.mark.parametrize("remote", [False, True])
def test_a_tensor_in_several_extents_has_one_digest_of_them_all(
    tmp_path: Path, remote: bool
) -> None:
    """Consecutive pieces with one name are one tensor (a tensor-parallel slice): its digest
    covers every piece in order, out of order in the source included."""
    data = bytes(range(256)) * 40
    srcf = tmp_path / "s.bin"
    srcf.write_bytes(data)
    dst_path = tmp_path / "d.bin"
    cuts = {"a": [(100, 50), (10, 30), (500, 0), (2000, 1000)], "b": [(0, 0)], "c": [(7, 9)]}
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        local = LocalFile.open(srcf)
        with local:
            src: ByteSource = NoDescriptor(local) if remote else local
            pieces = [Extent(src, o, n, name) for name, cs in cuts.items() for o, n in cs]
            got = copy_pieces(LocalSink(dst, str(dst_path)), b"HEADER!!", pieces)
    finally:
        os.close(dst)
    want = {n: b"".join(data[o : o + k] for o, k in cs) for n, cs in cuts.items()}
    assert got.tensors == {n: xxh(b) for n, b in want.items()}
    assert dst_path.read_bytes() == b"HEADER!!" + b"".join(want.values())
