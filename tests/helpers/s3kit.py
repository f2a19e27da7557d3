"""Shared pieces of the object-storage tests (tests/system/test_s3*.py).

``S3`` is what the ``s3`` fixture yields; :func:`synth_tiny` is the body of their
module-scoped ``tiny`` fixture (the ``tiny-gptq`` preset, synthesized once a module);
:func:`random_model` writes one file of random F16 tensors large enough that each shard
takes several multipart parts; :func:`cli_options` turns storage options into the CLI's
``--storage-option`` flags.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from safeshard.format.header import TensorSpec, build_header
from safeshard.ops import synth

S3 = tuple[str, dict[str, Any]]
"""``(s3://bucket, storage_options)``, as the ``s3`` fixture yields it."""

MiB = 1024 * 1024


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(folder: Path) -> Path:
    """The (first) ``.safetensors`` file in ``folder``."""
    return next(folder.glob("*.safetensors"))


def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny-gptq`` preset in a fresh folder (use as a module-scoped fixture)."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-gptq"
    synth.synthesize(folder, "tiny-gptq")
    return folder


def random_model(folder: Path, layers: int, mib: int, *, embed: bool = False) -> Path:
    """``folder/model.safetensors``: ``layers`` random F16 tensors of ``mib`` MiB each
    (``model.layers.{i}.mlp.up_proj.weight``), after a small embedding if ``embed``."""
    n = mib * MiB // 2
    specs = [TensorSpec("model.embed_tokens.weight", "F16", (64, 64), 64 * 64 * 2)] if embed else []
    specs += [
        TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", "F16", (n,), 2 * n)
        for i in range(layers)
    ]
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(build_header(specs, {"format": "pt"}))
        for s in specs:
            f.write(os.urandom(s.nbytes))
    return path


def cli_options(opts: dict[str, Any]) -> list[str]:
    """The ``--storage-option`` flags that give the CLI the ``s3`` fixture's options."""
    ck = opts["client_kwargs"]
    return [
        "--storage-option",
        f"key={opts['key']}",
        "--storage-option",
        f"secret={opts['secret']}",
        "--storage-option",
        f"client_kwargs.endpoint_url={ck['endpoint_url']}",
        "--storage-option",
        "client_kwargs.region_name=us-east-1",
        "--storage-option",
        "skip_instance_cache=true",
    ]
