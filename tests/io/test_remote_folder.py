"""RemoteFolder: the output transaction on object storage, against a real S3 server."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from safeshard.errors import WriteError
from safeshard.io.journal import FileRecord
from safeshard.io.remote import RemoteFolder, RemoteSink, _PartUploader, filesystem, part_size


def uploads(fs: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in fs.list_multipart_uploads(bucket) or []]


def test_part_size_keeps_uploads_under_the_part_limit() -> None:
    for size in (0, 1, 10**9, 50 * 10**9, 5 * 10**12):
        ps = part_size(size)
        assert ps >= 8 * 2**20 and -(-size // ps) < 10_000


def test_write_stage_and_commit(s3: tuple[str, dict[str, Any]]) -> None:
    base, options = s3
    url = f"{base}/model"
    with RemoteFolder(url, storage_options=options) as tx:
        tx.write_bytes("a.safetensors", b"A" * 10)
        tx.write_bytes("m.safetensors.index.json", b"old index")
    with RemoteFolder(url, storage_options=options) as tx:
        assert tx.checkpoint_files([".safetensors", ".index.json"]) == [
            "a.safetensors",
            "m.safetensors.index.json",
        ]
        tmp, _ = tx.stage("b.safetensors", lambda sink: sink.write(b"B" * 20), size=20)
        link = tx.stage_link("a.safetensors", "c.safetensors")
        tx.commit(
            [(tmp, "b.safetensors"), (link, "c.safetensors")],
            ["a.safetensors"],
            finals={"m.safetensors.index.json": b"new index"},
        )
    fs, root = filesystem(url, options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True))
    assert names == ["b.safetensors", "c.safetensors", "m.safetensors.index.json"]
    assert fs.cat_file(f"{root}/c.safetensors") == b"A" * 10
    assert fs.cat_file(f"{root}/m.safetensors.index.json") == b"new index"


def test_a_failed_upload_is_aborted_and_leaves_nothing(s3: tuple[str, dict[str, Any]]) -> None:
    base, options = s3
    url = f"{base}/out"
    fs, root = filesystem(url, options)
    bucket = root.split("/")[0]

    def fill(sink: Any) -> None:
        for _ in range(3):  # two full parts uploaded, then a failure
            sink.write(b"x" * (16 * 2**20))
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError), RemoteFolder(url, storage_options=options) as tx:
        tx.write("big.safetensors", fill, size=48 * 2**20)
    assert uploads(fs, bucket) == []
    assert not fs.exists(f"{root}/big.safetensors")


def _half_upload(fs: Any, key: str) -> None:
    """A multipart upload with one part uploaded, then "killed": no complete, no abort."""
    f = fs.open(key, "wb", block_size=5 * 2**20)
    f.write(b"x" * (6 * 2**20))
    f.flush()
    f.closed = True  # (so this test's finalizer does not complete it either)


@pytest.mark.parametrize("sub", ["out", "a/b/c", ""])
def test_only_uploads_of_keys_this_run_writes_are_aborted(
    s3: tuple[str, dict[str, Any]], sub: str
) -> None:
    """Issue 16.8: another tool's upload in progress under the prefix is left alone; a
    killed run's upload of a key this run writes, and of safeshard's temporaries, are
    aborted, at any depth including the bucket root."""
    base, options = s3
    url = f"{base}/{sub}" if sub else base
    fs, root = filesystem(url, options)
    bucket = root.split("/", 1)[0]
    pre = f"{sub}/" if sub else ""
    _half_upload(fs, f"{root}/model.safetensors")  # a killed run's
    _half_upload(fs, f"{root}/.safeshard-tmp-stage-x.safetensors.part")  # a killed stage
    _half_upload(fs, f"{root}/other-tool.bin")  # someone else's, in progress
    with RemoteFolder(url, storage_options=options) as tx:
        assert sorted(uploads(fs, bucket)) == [f"{pre}model.safetensors", f"{pre}other-tool.bin"]
        tx.start("split", "fp")
        tx.write_bytes("model.safetensors", b"new")
        assert uploads(fs, bucket) == [f"{pre}other-tool.bin"]
        assert sum("aborted an incomplete upload" in r for r in tx.recovered) == 2
        tx.commit()
    assert fs.cat_file(f"{root}/model.safetensors") == b"new"


def _fill(n: int, byte: bytes = b"x") -> Any:
    def fill(sink: Any) -> int:
        sink.write(byte * n)
        return n

    return fill


def test_a_file_finishes_while_the_next_is_written(
    s3: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file's last parts and completion go on while the second is written: its
    completion is held until the second has begun (a folder that finished each file
    before the next would wait out the timeout, and the order below would differ). Its
    journal record waits for the completion, and the commit for both files."""
    base, options = s3
    url = f"{base}/overlap"
    fs, root = filesystem(url, options)
    second_begun = threading.Event()
    held: list[bool] = []
    complete = _PartUploader.complete

    def held_complete(self: _PartUploader) -> None:
        if not held:
            held.append(second_begun.wait(timeout=10))
        complete(self)

    monkeypatch.setattr(_PartUploader, "complete", held_complete)
    steps: list[str] = []

    def on_step(step: str) -> None:
        steps.append(step)
        if step == "writing:b.safetensors":
            second_begun.set()

    size = 9 * 2**20  # two parts
    with RemoteFolder(url, storage_options=options, on_step=on_step) as tx:
        tx.start("split", "fp")
        tx.write("a.safetensors", _fill(size, b"a"), size=size)
        tx.record("a.safetensors", FileRecord(size, None))
        tx.write("b.safetensors", _fill(size, b"b"), size=size)
        tx.record("b.safetensors", FileRecord(size, None))
        tx.commit()
    assert held == [True]
    assert steps.index("writing:b.safetensors") < steps.index("written:a.safetensors")
    assert steps.index("written:a.safetensors") < steps.index("journaled:a.safetensors")
    assert steps.index("journaled:a.safetensors") < steps.index("journaled:b.safetensors")
    assert steps.index("journaled:b.safetensors") < steps.index("committing")
    assert fs.cat_file(f"{root}/a.safetensors") == b"a" * size
    assert fs.cat_file(f"{root}/b.safetensors") == b"b" * size


def test_a_completion_failing_in_the_background_is_raised_and_leaves_nothing(
    s3: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error of a completion that failed while the next file was written is raised
    by the next step; the failed file is neither journaled nor left behind, nor are its
    parts, and the lock is released."""
    base, options = s3
    url = f"{base}/failing"
    fs, root = filesystem(url, options)
    bucket = root.split("/")[0]
    complete = _PartUploader.complete

    def failing_complete(self: _PartUploader) -> None:
        if self.key.endswith("a.safetensors"):
            raise WriteError("the server refused the completion", filename="a.safetensors")
        complete(self)

    monkeypatch.setattr(_PartUploader, "complete", failing_complete)
    steps: list[str] = []
    size = 9 * 2**20
    with (
        pytest.raises(WriteError, match="refused the completion"),
        RemoteFolder(url, storage_options=options, on_step=steps.append) as tx,
    ):
        tx.start("split", "fp")
        tx.write("a.safetensors", _fill(size), size=size)
        tx.record("a.safetensors", FileRecord(size, None))
        tx.write("b.safetensors", _fill(size), size=size)
    assert not [s for s in steps if s.endswith(":a.safetensors") and "writing" not in s]
    left = {p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)} if fs.exists(root) else set()
    assert not {"a.safetensors", "b.safetensors", ".safeshard.lock"} & left, left
    assert uploads(fs, bucket) == []


def test_a_sink_written_after_its_upload_finished_says_so(s3: tuple[str, dict[str, Any]]) -> None:
    """A finished upload holds no part buffer: writing to it again is a WriteError naming
    the object, not bytes silently lost."""
    base, options = s3
    fs, root = filesystem(f"{base}/done", options)
    sink = RemoteSink(fs, f"{root}/a.safetensors", "a.safetensors", 9 * 2**20)
    sink.write(b"x" * (9 * 2**20))
    sink.commit()
    with pytest.raises(WriteError, match=r"a\.safetensors: written to after its upload"):
        sink.write(b"y")
    assert fs.cat_file(f"{root}/a.safetensors") == b"x" * (9 * 2**20)
