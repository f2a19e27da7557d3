"""``safeshard load-bench s3://...`` against a real S3 API (moto's server on 127.0.0.1):
the URL is kept as written (it was turned into the local path ``s3:/...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import safeshard
from safeshard.checkpoint import read_header
from safeshard.cli import main
from safeshard.ops.synth import synthesize

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def flags(opts: dict[str, Any]) -> list[str]:
    ck = opts["client_kwargs"]
    pairs = [
        f"key={opts['key']}",
        f"secret={opts['secret']}",
        f"client_kwargs.endpoint_url={ck['endpoint_url']}",
        "client_kwargs.region_name=us-east-1",
        "skip_instance_cache=true",
    ]
    return [x for p in pairs for x in ("--storage-option", p)]


@pytest.mark.slow
def test_load_bench_reads_a_checkpoint_in_s3(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    base, opts = s3
    folder = synthesize(tmp_path / "m", "tiny-llama", layers=1, tokenizer=False)
    total = sum(sum(t.nbytes for t in read_header(p).tensors) for p in folder.glob("*.safetensors"))
    url = f"{base}/model"
    safeshard.split(folder, url, max_shard_size="200KB", storage_options=opts)
    args = ["load-bench", url, "--json", "--variant", "sequential", "--variant", "baseline"]
    env = {  # credentials and endpoint from the environment, as in the report
        "HF_HUB_OFFLINE": "1",
        "AWS_ACCESS_KEY_ID": str(opts["key"]),
        "AWS_SECRET_ACCESS_KEY": str(opts["secret"]),
        "AWS_ENDPOINT_URL": opts["client_kwargs"]["endpoint_url"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["path"] == url and report["files"] >= 2
    assert report["tensor_bytes"] == total
    assert set(report["runs"]) == {"remote"}
    runs = report["runs"]["remote"]
    assert set(runs) == {"sequential", "baseline"}
    for r in runs.values():
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(total / r["median_s"] / 1e9)
    assert report["summary"]["remote_parallel_vs_baseline"] is None  # parallel did not run


def test_load_bench_on_a_url_keeps_it_and_refuses_cold_and_warm(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    base, opts = s3
    folder = synthesize(tmp_path / "m", "tiny-llama", layers=1, tokenizer=False)
    url = f"{base}/model"
    safeshard.split(folder, url, storage_options=opts)
    for mode in ("--warm", "--cold"):
        res = CliRunner().invoke(main, ["load-bench", url, mode, *flags(opts)])
        assert res.exit_code == 2, res.output
        assert f"{mode} needs local files" in res.output and url in res.output
    res = CliRunner().invoke(main, ["load-bench", f"{base}/nothing", "--json", *flags(opts)])
    assert res.exit_code == 3, res.output
    assert f"{base}/nothing" in res.output
    assert base.replace("s3://", "s3:/") + "/" not in res.output  # never made a local path
