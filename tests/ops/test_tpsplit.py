"""split --tp: one ordinary checkpoint per tensor-parallel rank, and merge back.

References: each rank folder's tensors against ``safeshard.load(src, tp_plan=..., rank=r,
world_size=N)`` (itself checked against transformers' own TP sharding in
tests/runtime/test_tp.py), read with the official ``safetensors.torch.load_file``; the
merge against the source's tensors and against a plain ``merge`` of the source.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import safeshard
from helpers.tpkit import tiny_llama, tiny_phi3
from safeshard import TensorParallelError
from safeshard.cli import main
from safeshard.errors import CheckpointNotFoundError, IndexFormatError, OutputExistsError
from safeshard.ops import tpmerge
from safeshard.ops.inspect import inspect_tp
from safeshard.ops.synth import synthesize
from safeshard.ops.tpsplit import TpSplitResult

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

PHI3_SECTIONS = {
    "layers.*.self_attn.qkv_proj": "qkv_colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_up_proj": "packed_colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "embed_tokens": "embedding_rowwise",
    "lm_head": "colwise_gather_output",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tpsplit-models")
    return {
        # fewer key/value heads than ranks at both world sizes: whole heads, replicated
        "llama": tiny_llama(root / "llama", tied=False, kv=2, seed=3),
        "llama-tied": tiny_llama(root / "llama-tied", tied=True, kv=1, seed=3),
        "phi3": tiny_phi3(root / "phi3", seed=4),
    }


def _shards(folder: Path) -> dict[str, Any]:
    """Every tensor of a rank folder through the official reader, after checking the
    index against the files."""
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, Any] = {}
    files = sorted(set(idx["weight_map"].values()))
    assert files == sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    for f in files:
        part = st_torch.load_file(folder / f)
        assert {n for n, v in idx["weight_map"].items() if v == f} == set(part)
        out.update(part)
    assert idx["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    return out


CASES = [
    ("llama", "auto"),
    ("llama-tied", "auto"),
    ("phi3", "auto"),
    ("phi3", "sections"),
]


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize(("model", "plan_name"), CASES)
def test_rank_folders_hold_the_rank_slices_and_merge_back(
    models: dict[str, Path], tmp_path: Path, model: str, plan_name: str, ws: int
) -> None:
    src = models[model]
    plan: Any = PHI3_SECTIONS if plan_name == "sections" else "auto"
    out = tmp_path / "tp"
    res = safeshard.split(src, out, tp=ws, tp_plan=plan, max_shard_size="40KB")
    assert isinstance(res, TpSplitResult) and res.world_size == ws
    folders = [out / f"rank-{r:05d}-of-{ws:05d}" for r in range(ws)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f.name for f in folders), "tp.json"])
    record = json.loads((out / "tp.json").read_text())
    assert record["world_size"] == ws
    assert record["ranks"] == [f.name for f in folders]
    for r, folder in enumerate(folders):
        assert (folder / "config.json").is_file()
        assert (folder / "model.safeshard.json").is_file()
        ref = safeshard.load(src, tp_plan=plan, rank=r, world_size=ws)
        got = _shards(folder)
        again = safeshard.load(folder)
        assert set(got) == set(ref) == set(again)
        for n, t in ref.items():
            assert torch.equal(got[n], t), n
            assert torch.equal(again[n], t), n
            entry = record["tensors"][n]
            if entry["dim"] is not None:
                rows = sum(b - a for a, b in entry["slices"][r])
                assert t.shape[entry["dim"]] == rows
        assert safeshard.verify(folder).ok
    # the merge rebuilds the source, and writes what a plain merge of the source writes
    merged = safeshard.merge(out, tmp_path / "merged.safetensors")
    plain = safeshard.merge(src, tmp_path / "plain.safetensors")
    full = st_torch.load_file(src / "model.safetensors")
    back = st_torch.load_file(tmp_path / "merged.safetensors")
    assert list(back) == list(full) or set(back) == set(full)
    for n, t in full.items():
        assert torch.equal(back[n], t), n
    assert (tmp_path / "merged.safetensors").read_bytes() == (
        tmp_path / "plain.safetensors"
    ).read_bytes()
    assert (merged.size, merged.tensors, merged.lossless) == (
        plain.size,
        plain.tensors,
        plain.lossless,
    )


def test_gqa_head_on_several_ranks_is_taken_once(models: dict[str, Path], tmp_path: Path) -> None:
    """Two key/value heads and 4 ranks: each head is on two ranks; the record says so and
    merge takes each head once. One head on every rank is recorded as whole."""
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=4)
    rec = json.loads((out / "tp.json").read_text())
    k = rec["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert k["dim"] == 0 and k["slices"] == [[[0, 8]], [[0, 8]], [[8, 16]], [[8, 16]]]
    safeshard.merge(out, tmp_path / "m.safetensors")
    got = st_torch.load_file(tmp_path / "m.safetensors")
    full = st_torch.load_file(models["llama"] / "model.safetensors")
    assert all(torch.equal(got[n], full[n]) for n in full)
    safeshard.split(models["llama-tied"], tmp_path / "tied", tp=4)
    rec = json.loads((tmp_path / "tied" / "tp.json").read_text())
    assert rec["tensors"]["model.layers.0.self_attn.k_proj.weight"]["dim"] is None


@pytest.mark.parametrize("batch", [None, 3])
def test_lossless_source_comes_back_byte_for_byte(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int | None
) -> None:
    """A safeshard split of a single file records the original: split --tp of it carries
    the original header and the tensor digests, and merge restores the file exactly (also
    copied in batches of a few extents, with --sha256)."""
    if batch is not None:
        monkeypatch.setattr(tpmerge, "BATCH", batch)
    first = tmp_path / "split"
    safeshard.split(models["llama"], first, max_shard_size="100KB")
    out = tmp_path / "tp"
    res = safeshard.split(first, out, tp=2)
    assert res.lossless
    merged = safeshard.merge(out, tmp_path / "m.safetensors", sha256=True)
    assert merged.lossless and merged.verified == merged.tensors
    original = (models["llama"] / "model.safetensors").read_bytes()
    assert (tmp_path / "m.safetensors").read_bytes() == original
    assert merged.sha256 == hashlib.sha256(original).hexdigest()


def test_a_changed_rank_file_fails_the_digest_check(
    models: dict[str, Path], tmp_path: Path
) -> None:
    first = tmp_path / "split"
    safeshard.split(models["llama"], first, max_shard_size="100KB")
    out = tmp_path / "tp"
    safeshard.split(first, out, tp=2)
    shard = out / "rank-00001-of-00002" / "model.safetensors"
    if not shard.exists():
        shard = sorted((out / "rank-00001-of-00002").glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(safeshard.errors.ShardMismatchError, match="does not match the digest"):
        safeshard.merge(out, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_gptq_world_size_that_breaks_a_group_writes_nothing(tmp_path: Path) -> None:
    folder = synthesize(tmp_path / "g", "tiny-gptq", tokenizer=False)  # group 128, hidden 256
    out = tmp_path / "tp"
    with pytest.raises(TensorParallelError, match="splits a GPTQ group"):
        safeshard.split(folder, out, tp=4)
    assert not out.exists()
    safeshard.split(folder, out, tp=2)
    for r in range(2):
        ref = safeshard.load(folder, tp_plan="auto", rank=r, world_size=2)
        got = safeshard.load(out / f"rank-{r:05d}-of-00002")
        assert all(torch.equal(got[n], ref[n]) for n in ref)
    safeshard.merge(out, tmp_path / "m.safetensors")
    full = safeshard.load(folder)
    back = st_torch.load_file(tmp_path / "m.safetensors")
    assert set(back) == set(full) and all(torch.equal(back[n], full[n]) for n in full)


def test_an_existing_output_needs_force(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2)
    with pytest.raises(OutputExistsError):
        safeshard.split(models["llama"], out, tp=2)
    safeshard.split(models["llama"], out, tp=2, force=True, max_shard_size="40KB")
    assert len(list((out / "rank-00000-of-00002").glob("model-*.safetensors"))) > 1
    assert not (out / "rank-00000-of-00002" / "model.safetensors").exists()


def test_other_commands_on_a_tp_folder_say_what_it_is(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2)
    with pytest.raises(
        CheckpointNotFoundError, match=r"output of split --tp .*2 rank folders: rank-00000-of"
    ):
        safeshard.load(out)
    with pytest.raises(CheckpointNotFoundError, match=r"safeshard\.inspect_tp and"):
        safeshard.inspect(out)
    assert safeshard.inspect_tp(out) is not None
    assert safeshard.inspect_tp(models["llama"]) is None  # an ordinary checkpoint


@pytest.mark.parametrize("manifest", [True, False])
def test_inspect_shows_the_record_and_each_rank_folder(
    models: dict[str, Path], tmp_path: Path, manifest: bool
) -> None:
    """inspect on a split --tp folder: the rank folders as their checkpoints read, and
    the file merge writes, to the byte."""
    src = models["phi3"]
    if manifest:  # a source split by safeshard has a manifest: tp.json gets the digests
        safeshard.split(src, tmp_path / "src", max_shard_size="60KB")
        src = tmp_path / "src"
    out = tmp_path / "tp"
    safeshard.split(src, out, tp=2)
    got = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert got.exit_code == 0, got.output
    rep = json.loads(got.output)
    assert rep["kind"] == "tensor-parallel" and rep["world_size"] == 2
    assert [r["name"] for r in rep["ranks"]] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    for r in rep["ranks"]:
        ck = safeshard.open_checkpoint(out / r["name"])
        assert (r["files"], r["file_size"], r["tensors"], r["tensor_bytes"]) == (
            len(ck.headers),
            ck.file_size,
            len(ck.entries),
            ck.total_tensor_bytes,
        )
    assert rep["file_size"] == sum(r["file_size"] for r in rep["ranks"])
    whole = safeshard.open_checkpoint(src)
    assert rep["tensor_count"] == len(whole.entries)
    assert rep["total_tensor_bytes"] == whole.total_tensor_bytes
    assert rep["sliced_tensors"] + rep["replicated_tensors"] == rep["tensor_count"]
    assert rep["sliced_tensors"] > rep["replicated_tensors"] > 0
    assert rep["tp_plan"] == json.loads((out / "tp.json").read_text())["tp_plan"]
    assert rep["digests"] is manifest
    merged = safeshard.merge(out, tmp_path / "merged.safetensors")
    assert rep["merged_file_size"] == (tmp_path / "merged.safetensors").stat().st_size
    assert rep["lossless"] is merged.lossless and rep["reason"] == merged.reason
    text = CliRunner().invoke(main, ["inspect", str(out)])
    assert text.exit_code == 0, text.output
    assert "world size 2" in text.output and "rank-00001-of-00002" in text.output
    assert f"{rep['sliced_tensors']} sliced" in text.output


def test_inspect_of_a_tp_folder_escapes_the_record_and_names_a_missing_rank(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2)
    rec = json.loads((out / "tp.json").read_text())
    rec["tp_plan"] = {"[red]lm_head[/red]\x1b[2J": "colwise_gather_output", **rec["tp_plan"]}
    (out / "tp.json").write_text(json.dumps(rec))
    got = CliRunner().invoke(main, ["inspect", str(out)], color=True)
    assert got.exit_code == 0, got.output
    assert "[red]lm_head[/red]" in got.output and "\x1b[2J" not in got.output
    shutil.rmtree(out / "rank-00001-of-00002")
    got = CliRunner().invoke(main, ["inspect", str(out)])
    assert got.exit_code == 3 and "rank-00001-of-00002" in got.output, got.output


def test_force_with_another_world_size_removes_the_old_rank_folders(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Rank folders of an earlier split with another world size need --force, which
    empties them (weights, index, manifest, copied sidecars) and removes them; a file
    safeshard did not write stays, with its folder."""
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=4, max_shard_size="60KB")
    (out / "tp.json").unlink()  # even without the old record
    (out / "rank-00003-of-00004" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"rank-00000-of-00004/"):
        safeshard.split(models["llama"], out, tp=2)
    assert len(list(out.iterdir())) == 4
    res = safeshard.split(models["llama"], out, tp=2, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "rank-00000-of-00002",
        "rank-00001-of-00002",
        "rank-00003-of-00004",
        "tp.json",
    ]
    assert [p.name for p in (out / "rank-00003-of-00004").iterdir()] == ["notes.txt"]
    assert "rank-00000-of-00004/model.safetensors.index.json" in res.removed
    assert "rank-00002-of-00004/config.json" in res.removed
    rep = safeshard.verify(out)
    assert rep.codes == {"tp-stray-rank"}  # the folder kept for the user's file
    (out / "rank-00003-of-00004" / "notes.txt").unlink()
    (out / "rank-00003-of-00004").rmdir()
    assert safeshard.verify(out).ok


class _Killed(Exception):
    pass


@pytest.mark.parametrize("at", [1, 4, 7])
def test_an_interrupted_split_tp_is_finished_by_resume(
    models: dict[str, Path], tmp_path: Path, at: int
) -> None:
    """A split --tp stopped after its ``at``-th journaled shard (rank 0's, the middle of
    rank 1's, its last) leaves no tp.json; --resume keeps every finished shard of every
    rank (re-hashed), writes only the rest, and the result merges to the bytes an
    uninterrupted split --tp merges to."""
    out = tmp_path / "tp"
    ref = safeshard.split(models["llama"], tmp_path / "ref", tp=2, max_shard_size="60KB")
    assert isinstance(ref, TpSplitResult)
    per_rank = [len(r.files) for r in ref.ranks]
    assert at < sum(per_rank) and per_rank[0] >= 2
    seen = 0

    def kill(step: str) -> None:
        nonlocal seen
        if step.startswith("journaled:"):
            seen += 1
            if seen == at:
                raise _Killed(step)

    with pytest.raises(_Killed):
        safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB", on_step=kill)
    assert not (out / "tp.json").exists()
    with pytest.raises(OutputExistsError, match="--resume"):
        safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB")
    res = safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB", resume=True)
    assert isinstance(res, TpSplitResult)
    kept = [f.file for r in res.ranks for f in r.files if f.status == "kept"]
    written = [f.file for r in res.ranks for f in r.files if f.status == "written"]
    assert len(kept) == at and len(written) == sum(per_rank) - at
    assert safeshard.verify(out).ok
    safeshard.merge(out, tmp_path / "m.safetensors")
    safeshard.merge(tmp_path / "ref", tmp_path / "ref.safetensors")
    merged = (tmp_path / "m.safetensors").read_bytes()
    assert merged == (tmp_path / "ref.safetensors").read_bytes()
    for rank in ("rank-00000-of-00002", "rank-00001-of-00002"):
        files = sorted(p.name for p in (out / rank).glob("*.safetensors"))
        assert files == sorted(p.name for p in (tmp_path / "ref" / rank).glob("*.safetensors"))
        for f in files:
            assert (out / rank / f).read_bytes() == (tmp_path / "ref" / rank / f).read_bytes()
    again = safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB", resume=True)
    assert isinstance(again, TpSplitResult)
    assert all(f.status == "kept" for r in again.ranks for f in r.files)
    with pytest.raises(safeshard.UsageError, match="pick one"):
        safeshard.split(models["llama"], out, tp=2, resume=True, force=True)


def test_a_bad_record_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2)
    rec = json.loads((out / "tp.json").read_text())
    rec["ranks"] = ["../elsewhere", "rank-00001-of-00002"]
    (out / "tp.json").write_text(json.dumps(rec))
    with pytest.raises(IndexFormatError):
        safeshard.merge(out, tmp_path / "m.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_an_unreadable_record_is_named_by_merge_and_inspect(
    models: dict[str, Path], tmp_path: Path, text: str
) -> None:
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2)
    (out / "tp.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(IndexFormatError, match=r"tp\.json: not a readable JSON object"):
        safeshard.merge(out, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    got = CliRunner().invoke(main, ["inspect", str(out)])
    assert got.exit_code == 3 and "not a readable JSON object" in got.output, got.output


@pytest.mark.parametrize("form", ["userinfo", "userinfo_pct", "presigned", "query_token"])
def test_an_unreadable_record_behind_a_credential_url_names_no_secret(
    models: dict[str, Path], tmp_path: Path, form: str
) -> None:
    from helpers import fuzzkit
    from helpers.faultproxy import FolderServer

    root = tmp_path / "served"
    safeshard.split(models["llama"], root / "tp", tp=2)
    (root / "tp" / "tp.json").write_text("{not json")
    with FolderServer(root) as srv:
        url = fuzzkit.credential_url(srv.url, "tp", form)
        for call in (
            lambda: safeshard.merge(url, tmp_path / "m.safetensors"),
            lambda: safeshard.inspect_tp(url),
        ):
            with pytest.raises(IndexFormatError, match="not a readable JSON object") as got:
                call()
            assert fuzzkit.leaked(str(got.value)) == []


def test_verify_checks_tp_json_and_every_rank_folder(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """verify on a split --tp folder checks each rank folder (findings named
    rank-.../FILE), that each holds the slices tp.json records, and that no other rank
    folder lies beside them."""
    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB")
    rep = safeshard.verify(out)
    assert rep.ok, rep.findings
    assert rep.ranks == 2 and "tensor-parallel" in rep.checks and "manifest" in rep.checks
    one = safeshard.verify(out / "rank-00000-of-00002")
    assert rep.tensors == one.tensors and rep.shards > one.shards
    assert rep.bytes_verified > one.bytes_verified

    got = CliRunner().invoke(main, ["verify", str(out)])
    assert got.exit_code == 0 and "2 tensor-parallel rank folders" in got.output, got.output
    with pytest.raises(safeshard.UsageError, match="merge it first"):
        safeshard.verify(out, against=models["llama"])

    # a changed byte in rank 1: the rank's manifest check names the file
    shard = sorted((out / "rank-00001-of-00002").glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    rep = safeshard.verify(out)
    assert rep.codes == {"manifest-tensor-hash"}
    assert {f.file for f in rep.findings} == {f"rank-00001-of-00002/{shard.name}"}

    # a stray rank folder of another world size, and a record of other slices
    safeshard.split(models["llama"], tmp_path / "tp4", tp=4)
    (tmp_path / "tp4" / "rank-00003-of-00004").rename(out / "rank-00003-of-00004")
    rec = json.loads((out / "tp.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    rec["tensors"][q]["slices"] = [[[0, 8]], [[8, rec["tensors"][q]["shape"][0]]]]
    (out / "tp.json").write_text(json.dumps(rec))
    rep = safeshard.verify(out)
    assert {"tp-stray-rank", "tp-rank-tensors"} <= rep.codes
    assert [f.file for f in rep.by_code("tp-stray-rank")] == ["rank-00003-of-00004"]
    assert {f.tensor for f in rep.by_code("tp-rank-tensors")} == {q}

    # a missing rank folder; an unreadable record
    shutil.rmtree(out / "rank-00000-of-00002")
    assert "tp-rank-missing" in safeshard.verify(out).codes
    (out / "tp.json").write_text("{not json")
    rep = safeshard.verify(out)
    assert rep.codes == {"tp-record"} and rep.ranks == 0
    got = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert got.exit_code == 1 and json.loads(got.stdout)["findings"][0]["code"] == "tp-record"


def test_verify_of_a_tp_folder_reads_each_header_once(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slice check uses the headers the rank's verify read (in object storage each
    header read is two ranged GETs)."""
    from safeshard.format.header import read_header_with as real

    out = tmp_path / "tp"
    safeshard.split(models["llama"], out, tp=2, max_shard_size="60KB")
    shards = sorted(p.relative_to(out) for p in out.glob("rank-*/model-*.safetensors"))
    read: list[str] = []

    def count(fetch: Any, size: int, name: str) -> Any:
        read.append(name)
        return real(fetch, size, name)

    monkeypatch.setattr("safeshard.io.bytesrc.read_header_with", count)
    assert safeshard.verify(out).ok
    assert len(shards) > 2 and sorted(read) == sorted(str(out / p) for p in shards)


def test_cli_split_tp_json_and_merge(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tp"
    runner = CliRunner()
    got = runner.invoke(
        main, ["split", str(models["llama"]), str(out), "--tp", "2", "-s", "60KB", "--json"]
    )
    assert got.exit_code == 0, got.output
    obj = json.loads(got.stdout)
    assert obj["world_size"] == 2 and obj["tp_record"] == "tp.json"
    assert [r["folder"] for r in obj["ranks"]] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    assert all(r["index"] == "model.safetensors.index.json" for r in obj["ranks"])
    assert {s["file"].split("/")[0] for s in obj["shards"]} == {
        "rank-00000-of-00002",
        "rank-00001-of-00002",
    }
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers.*.mlp.down_proj": "rowwise"}))
    got = runner.invoke(
        main,
        ["split", str(models["llama"]), str(tmp_path / "p"), "--tp", "2", "--tp-plan", str(plan)],
    )
    assert got.exit_code == 0, got.output
    rec = json.loads((tmp_path / "p" / "tp.json").read_text())
    assert rec["tp_plan"] == {"layers.*.mlp.down_proj": "rowwise"}
    assert rec["tensors"]["model.layers.0.self_attn.q_proj.weight"]["dim"] is None
    got = runner.invoke(main, ["merge", str(out), str(tmp_path / "m.safetensors"), "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["tensors"] == len(st_torch.load_file(tmp_path / "m.safetensors"))
    bad = runner.invoke(
        main, ["split", str(models["llama"]), str(tmp_path / "q"), "--tp-plan", str(plan)]
    )
    assert bad.exit_code == 2


def test_s3_to_s3_split_tp_and_merge(
    models: dict[str, Path], tmp_path: Path, s3: tuple[str, dict[str, Any]]
) -> None:
    """In object storage both ways: the ranks written to a prefix (server copies where the
    source is in the same store), loaded from there, and merged back."""
    import fsspec

    base, options = s3
    fs = fsspec.filesystem("s3", **options)
    src = f"{base}/llama"
    for f in models["llama"].iterdir():
        fs.put_file(str(f), f"{src[len('s3://') :]}/{f.name}")
    out = f"{base}/tp"
    safeshard.split(src, out, tp=2, max_shard_size="60KB", storage_options=options)
    for r in range(2):
        ref = safeshard.load(models["llama"], tp_plan="auto", rank=r, world_size=2)
        got = safeshard.load(f"{out}/rank-{r:05d}-of-00002", storage_options=options)
        assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    rep = inspect_tp(out, storage_options=options)
    assert rep is not None and [r.files for r in rep.ranks] == [
        len(fs.glob(f"{out[len('s3://') :]}/rank-{r:05d}-of-00002/model-*.safetensors"))
        for r in range(2)
    ]
    safeshard.merge(out, tmp_path / "m.safetensors", storage_options=options)
    safeshard.merge(models["llama"], tmp_path / "p.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    assert rep.merged_file_size == (tmp_path / "m.safetensors").stat().st_size


def test_s3_split_tp_interrupted_is_finished_by_resume(
    models: dict[str, Path], tmp_path: Path, s3: tuple[str, dict[str, Any]]
) -> None:
    """Into object storage: a split --tp stopped after rank 1's first shard is journaled is
    finished by --resume, which keeps the shards the ranks' journal objects vouch for."""
    base, options = s3
    out = f"{base}/tp-resume"
    seen = 0

    def kill(step: str) -> None:
        nonlocal seen
        if step.startswith("journaled:"):
            seen += 1
            if seen == 4:
                raise _Killed(step)

    opts = {"tp": 2, "max_shard_size": "60KB", "storage_options": options}
    with pytest.raises(_Killed):
        safeshard.split(models["llama"], out, on_step=kill, **opts)  # type: ignore[arg-type]
    res = safeshard.split(models["llama"], out, resume=True, **opts)  # type: ignore[arg-type]
    assert isinstance(res, TpSplitResult)
    statuses = [f.status for r in res.ranks for f in r.files]
    assert statuses.count("kept") == 4 and "written" in statuses
    safeshard.merge(out, tmp_path / "m.safetensors", storage_options=options)
    safeshard.merge(models["llama"], tmp_path / "p.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
