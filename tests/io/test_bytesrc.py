"""bytesrc: LocalFile, read_into/read_exact over short reads, Extent, copy_source into a
Sink, header_of (golden bytes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from safeshard.errors import HeaderError, ReadError
from safeshard.format.header import TensorSpec, build_header
from safeshard.io.bytesrc import (
    ByteSource,
    Extent,
    LocalFile,
    LocalSink,
    Sink,
    copy_source,
    header_of,
    open_source,
    read_bytes,
    read_exact,
    read_into,
)

DATA = bytes(range(256)) * 4


class Dribble(ByteSource):
    """An in-memory source that returns at most ``step`` bytes a call (short reads)."""

    def __init__(self, data: bytes, step: int, name: str = "mem") -> None:
        self.data, self.step, self.name, self.size = data, step, name, len(data)
        self.calls = 0

    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        self.calls += 1
        chunk = self.data[offset : offset + self.step]
        done = 0
        for b in buffers:
            n = min(len(b), len(chunk) - done)
            b[:n] = chunk[done : done + n]
            done += n
            if done == len(chunk):
                break
        return done


class Failing(ByteSource):
    name, size = "broken", 100

    def readinto(self, buffers: Sequence[memoryview], offset: int) -> int:
        raise OSError(5, "Input/output error")


class Collect(Sink):
    def __init__(self) -> None:
        self.name = "mem"
        self.out = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data


def test_local_file_reads_and_closes(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(DATA)
    src = LocalFile.open(p)
    with src:
        assert (src.name, src.size) == (str(p), len(DATA))
        fd = src.fileno()
        assert fd is not None and fd >= 0
        buf = bytearray(10)
        assert src.readinto([memoryview(buf)], 250) == 10
        assert bytes(buf) == DATA[250:260]
    assert src.fileno() is None
    src.close()  # twice is fine


def test_open_source_of_a_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match=r"nope\.bin"):
        open_source(tmp_path / "nope.bin")


def test_read_into_retries_short_reads_across_buffers() -> None:
    src = Dribble(DATA, step=3)
    a, b, c = bytearray(5), bytearray(0), bytearray(7)
    got = read_into(src, [memoryview(a), memoryview(b), memoryview(c)], 100)
    assert got == 12 and bytes(a) + bytes(c) == DATA[100:112]
    assert src.calls == 4  # 3 + 3 + 3 + 3


def test_read_into_stops_at_the_end_and_read_bytes_clips() -> None:
    src = Dribble(DATA, step=64)
    buf = bytearray(16)
    assert read_into(src, [memoryview(buf)], len(DATA) - 6) == 6
    assert bytes(buf[:6]) == DATA[-6:]
    assert read_bytes(src, len(DATA) - 4, 100) == DATA[-4:]
    assert read_bytes(src, len(DATA) + 5, 10) == b""


def test_read_exact_names_what_was_cut_short() -> None:
    src = Dribble(DATA[:50], step=7, name="short.safetensors")
    with pytest.raises(ReadError, match=r"short\.safetensors.*ended at byte 50.*tensor x"):
        read_exact(src, [memoryview(bytearray(20))], 40, "tensor x")
    buf = bytearray(10)
    read_exact(src, [memoryview(buf)], 40, "tensor x")
    assert bytes(buf) == DATA[40:50]


def test_an_os_error_becomes_a_read_error_with_the_offset() -> None:
    with pytest.raises(ReadError, match=r"broken.*byte 12") as e:
        read_into(Failing(), [memoryview(bytearray(4))], 12)
    assert e.value.errno == 5


def test_extent_end() -> None:
    e = Extent(Dribble(DATA, 1), 10, 5, "t")
    assert (e.offset, e.nbytes, e.end, e.name) == (10, 5, 15, "t")


def test_copy_source_copies_everything_through_a_small_buffer() -> None:
    sink = Collect()
    assert copy_source(Dribble(DATA, step=5), sink, chunk=100) == len(DATA)
    assert bytes(sink.out) == DATA


def test_copy_source_into_a_local_sink(tmp_path: Path) -> None:
    p = tmp_path / "out.bin"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        sink = LocalSink(fd, str(p))
        copy_source(Dribble(DATA, step=1000), sink, chunk=300)
        assert sink.position == len(DATA)
    finally:
        os.close(fd)
    assert p.read_bytes() == DATA


def test_copy_source_of_a_source_that_lies_about_its_size() -> None:
    src = Dribble(DATA[:10], step=10)
    src.size = 20
    with pytest.raises(ReadError, match="ended at byte 10"):
        copy_source(src, Collect())


GOLDEN = (  # a header of 79 bytes, written by hand, then 4 data bytes
    b"\x4f\x00\x00\x00\x00\x00\x00\x00"
    b'{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"__metadata__":{"k":"v"}}'
    b"\x01\x02\x03\x04"
)


def test_header_of_golden_bytes() -> None:
    src = Dribble(GOLDEN, step=9, name="g.safetensors")
    h = header_of(src)
    assert [(t.name, t.dtype, t.shape, t.begin, t.end) for t in h.tensors] == [
        ("a", "F16", (2,), 0, 4)
    ]
    assert h.metadata == {"k": "v"}
    assert h.data_start == 8 + 79
    assert read_bytes(src, h.data_start, 4) == b"\x01\x02\x03\x04"


def test_header_of_a_truncated_header_names_the_source() -> None:
    raw = build_header([TensorSpec("a", "F16", (2,), 4)], None)
    with pytest.raises(HeaderError, match=r"cut\.safetensors"):
        header_of(Dribble(raw[:20], step=100, name="cut.safetensors"))
