"""``synth`` writes through the output transaction's safe temporary: a symlink planted at
the temporary's (predictable) name is removed, never written through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeshard.format import filenames
from safeshard.io import localfs as fsio
from safeshard.ops.synth import synthesize

OUTPUTS = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def test_a_symlink_planted_at_synths_temporary_name_is_never_written_through(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victims = []
    pid = os.getpid()  # synth runs in this process: its temporaries carry this pid
    for name in OUTPUTS:
        for tmp in (
            f"{filenames.TMP_PREFIX}{name}.{pid}",
            f"{filenames.TMP_PREFIX}{name}.{pid}.part",
        ):
            victim = tmp_path / f"victim-{tmp}"
            victim.write_text("keep me")
            (out / tmp).symlink_to(victim)
            victims.append(victim)
    synthesize(out, "tiny-llama", layers=1)
    for victim in victims:
        assert victim.read_bytes() == b"keep me", victim
    for name in OUTPUTS:
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert (out / "config.json").read_bytes().startswith(b"{")


def test_a_temporary_planted_between_removal_and_creation_is_refused(tmp_path: Path) -> None:
    """``O_EXCL``: a name that reappears after the leftover was removed is an error, not a
    file written through."""
    target = tmp_path / "f.bin"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    w = fsio.AtomicWriter(target)
    real_unlink = os.unlink

    def unlink_then_plant(path: str | os.PathLike[str]) -> None:
        real_unlink(path)
        if os.fspath(path) == os.fspath(w.tmp):
            os.symlink(victim, w.tmp)

    (tmp_path / w.tmp.name).write_text("leftover")
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "unlink", unlink_then_plant)
    try:
        with pytest.raises(OSError), w:
            w.write(b"payload", 0)
    finally:
        mp.undo()
    assert victim.read_text() == "keep me"
    assert not target.exists()
