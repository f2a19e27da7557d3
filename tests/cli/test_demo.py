"""`safeshard demo`: the main job end to end on the generated sample."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from safeshard.checkpoint import read_header, read_index
from safeshard.cli import main


def test_demo_runs_every_step_and_keeps_its_output(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--keep", str(keep)])
    assert result.exit_code == 0, result.output
    for step in ("inspect", "split", "verify", "merge", "load"):
        assert f"safeshard {step}" in result.output or f"safeshard.{step}" in result.output
    assert "OK:" in result.output  # verify found nothing
    assert "identical" in result.output and "DIFFERENT" not in result.output
    shards = sorted((keep / "tiny-gptq-sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    index = read_index(keep / "tiny-gptq-sharded" / "model.safetensors.index.json")
    assert sorted(index.shard_files()) == [p.name for p in shards]
    for p in shards:
        assert p.stat().st_size <= 700_000
        read_header(p)
    assert "walk: model.layers.0" in result.output


def test_demo_cleans_up_its_temp_folder(tmp_path: Path, monkeypatch: object) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # type: ignore[attr-defined]
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
