"""The source argument of ``split`` meets the local-or-remote decision once.

``io.store`` is the one module that decides whether a path is on this machine or in
object storage; the checkpoint door asks it once (:func:`safeshard.io.store.resolve`) and
carries the answer (a ``Place``) to the header reads, the manifest, the fingerprint, the
"output is the source" check and the copier. Every call of ``store.is_remote`` or
``store.is_url`` about the source is counted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshard
import safeshard.io.store as store
from safeshard.ops.synth import synthesize


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    seen: list[str] = []
    real_remote, real_url = store.is_remote, store.is_url

    def is_remote(path: object) -> bool:
        seen.append(str(path))
        return real_remote(path)

    def is_url(path: object) -> bool:
        seen.append(str(path))
        return real_url(path)

    monkeypatch.setattr(store, "is_remote", is_remote)
    monkeypatch.setattr(store, "is_url", is_url)
    yield seen


def about(seen: list[str], source: str) -> list[str]:
    return [s for s in seen if s.rstrip("/").startswith(source.rstrip("/"))]


@pytest.mark.parametrize("as_text", [True, False])
def test_a_local_source_is_decided_once(
    tmp_path: Path, decisions: list[str], as_text: bool
) -> None:
    src = tmp_path / "src"
    synthesize(src, "tiny-llama")
    decisions.clear()
    r = safeshard.split(str(src) if as_text else src, tmp_path / "out", max_shard_size=200_000)
    assert len(r.files) >= 2
    assert len(about(decisions, str(src))) == 1, about(decisions, str(src))


def test_a_source_in_object_storage_is_decided_once(
    tmp_path: Path, s3: tuple[str, dict[str, Any]], decisions: list[str]
) -> None:
    base, opts = s3
    src = tmp_path / "src"
    synthesize(src, "tiny-llama")
    safeshard.split(src, f"{base}/src", max_shard_size=10**9, storage_options=opts)
    decisions.clear()
    r = safeshard.split(
        f"{base}/src", tmp_path / "out", max_shard_size=200_000, storage_options=opts
    )
    assert len(r.files) >= 2
    assert len(about(decisions, f"{base}/src")) == 1, about(decisions, f"{base}/src")
