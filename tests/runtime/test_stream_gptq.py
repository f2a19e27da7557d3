"""safeshard.stream on a GPTQ checkpoint loaded through transformers' GPTQ integration.

The comparison runs in a subprocess (a bad GPTQ tensor can abort the process) with
``TMPDIR`` and ``TORCHINDUCTOR_CACHE_DIR`` in a temporary folder, as in ``clients.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.clients import GPTQ_CONFIG, INPUT_IDS

pytestmark = pytest.mark.gptq

CHILD = textwrap.dedent(
    """
    import json, shutil, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig
    import safeshard
    from safeshard.runtime.stream import streamer_of
    from safeshard.ops.synth import synthesize

    args = json.loads(sys.argv[1])
    work = args["work"]
    src = synthesize(work + "/one", "tiny-gptq")
    folder = work + "/sharded"
    safeshard.split(src, folder, max_shard_size="700KB")
    for name in ("config.json", "generation_config.json", "quantize_config.json"):
        shutil.copy(f"{src}/{name}", folder)
    ids = torch.tensor(args["ids"])
    q = GPTQConfig(**args["gptq"], backend="gptq_torch")
    full, info = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=q, device_map="cpu", dtype=torch.float16,
        output_loading_info=True,
    )
    assert not any(info.values()), info
    full.eval()
    with torch.no_grad():
        logits = full(ids).logits
        tokens = full.generate(ids, max_new_tokens=5, do_sample=False)
    del full

    probe = safeshard.stream(safeshard.empty_model(folder), folder)
    s = streamer_of(probe)
    biggest = max(u.nbytes for u in s.units if not u.rows)
    total = s.model_bytes
    quantized = sorted({
        t.name.rsplit(".", 1)[1] for spec in s.specs.values() for t in spec.tensors
        if any(sl.module is q for sl in t.slots for q in spec.quant)
    })
    s.close()
    out = {"quantized": quantized, "runs": []}
    for label, kw in [
        ("one block", {"max_resident_bytes": biggest}),
        ("half", {"max_resident_bytes": total // 2}),
        ("everything", {}),
        ("modules", {"max_resident_bytes": total // 2, "granularity": "module"}),
    ]:
        m = safeshard.stream(safeshard.empty_model(folder), folder, **kw)
        with torch.no_grad():
            same_logits = torch.equal(m(ids).logits, logits)
            same_tokens = torch.equal(m.generate(ids, max_new_tokens=5, do_sample=False), tokens)
        st = streamer_of(m).stats
        budget = kw.get("max_resident_bytes")
        out["runs"].append({
            "label": label, "logits": same_logits, "tokens": same_tokens,
            "within": budget is None or st.peak_resident_bytes <= budget,
        })
        streamer_of(m).close()
    print("RESULT " + json.dumps(out))
    """
)


def test_gptq_streamed_equals_the_full_load(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TMPDIR=str(tmp_path),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
        TOKENIZERS_PARALLELISM="false",
    )
    args = {"work": str(tmp_path), "ids": INPUT_IDS, "gptq": GPTQ_CONFIG}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["quantized"] == ["g_idx", "qweight", "qzeros", "scales"]
    for run in result["runs"]:
        assert run == {**run, "logits": True, "tokens": True, "within": True}, run
