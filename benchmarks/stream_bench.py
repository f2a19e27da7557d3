"""Benchmark: running a model bigger than memory, safeshard.stream against transformers.

Run with ``make bench-stream`` (or ``python benchmarks/stream_bench.py --help``). In one
run, under one temporary folder that is removed at the end, it:

1. synthesizes a Llama of about 2 GB in bf16 (hidden 2048, intermediate 5632, 20 layers,
   16 heads, 4 KV heads, vocab 32000; ``safeshard.synth`` values, so the logits are
   finite) and a GPTQ Llama (4-bit, group 128; hidden 1024, intermediate 2816, 12 layers,
   8 heads, 4 KV heads, vocab 32000: about 0.2 GB, because gptq_torch dequantizes every
   weight at every pass and a bigger one takes minutes per token on a small CPU), each
   split into 500 MB shards by ``safeshard.split``;
2. runs every route in a fresh subprocess, several times in rotating order, at the same
   budget (``--budget``, default 500MB; ``--gptq-budget``, default 100MB, for the GPTQ
   model, whose routes run with ``TORCH_COMPILE_DISABLE=1``: gptq_torch's per-module
   ``torch.compile`` takes minutes here and would dominate every route alike):

   - ``ram``: ``from_pretrained`` with everything in memory (the reference);
   - ``offload``: transformers' disk offload, ``device_map="auto"`` with
     ``max_memory={"cpu": budget}`` and an offload folder;
   - ``stream``: ``safeshard.stream`` with ``max_resident_bytes=budget``;
     ``stream-module``: the same with ``granularity="module"``; ``stream-small``: that at
     ``--small-budget`` (default 300MB; ``--gptq-small-budget`` 80MB), where its peak
     RSS is about the offload route's;

   each *warm* (the shards in the page cache after a first pass) and *out of RAM*
   (``cold``: every shard, and every file the offload route wrote to its offload folder,
   evicted from the page cache with ``POSIX_FADV_DONTNEED`` before the forward pass and
   before each generated token);
3. reports, as medians over the runs: the time of a 128-token forward pass, the decode
   time per token (greedy ``generate``), the bytes read from storage per token
   (``/proc/self/io`` ``read_bytes``; for ``stream`` also the bytes its units came to),
   the peak RSS (``VmHWM``) and the peak anonymous memory (``RssAnon``, sampled every
   5 ms), and whether the logits and tokens are ``torch.equal`` to the ``ram`` route's.

A third model, ``mixtral-moe`` (``--moe-layers``, default 8, quick 4), is a Mixtral-style
MoE (hidden 1024, 8 experts of intermediate 2048, top-2, 16 heads, 4 KV heads, vocab 32000,
bf16: about 1 GB), written by ``save_pretrained`` (so under the Hub's per-expert names,
which stream fuses with transformers' own conversion). It runs at ``--moe-budget`` (default
30% of its size), out of RAM only: ``offload``, ``stream`` (experts read by expert, into
the expert cache) and ``stream-block`` (``stream(..., experts=False)``: each block read
whole, experts included), with ``ram`` as the reference.

The machine's other load makes single numbers noisy: compare routes by the ratios of
medians of runs made side by side. ``--quick`` makes smaller models (6 and 4 layers) and
runs each route once. ``--keep DIR`` works in DIR and reuses the models found there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

PY = sys.executable
HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

PROMPT = 128
"""Tokens of the forward pass measured (``--gptq-prompt``, default 32, for GPTQ: its eager
dequantization makes a long one take half a minute here)."""
DECODE_PROMPT = 16
"""Prompt tokens before greedy decoding."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(paths: Sequence[Path]) -> None:
    """Drop ``paths`` from the page cache (pages mapped by a process stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- models


def make_models(work: Path, layers: int, gptq_layers: int, cap: str) -> dict[str, Path]:
    """The bf16 Llama and the GPTQ Llama, split into ``cap`` shards (reused if in ``work``)."""
    sys.path.insert(0, str(SRC))
    from safeshard import split
    from safeshard.ops.synth import Preset, synthesize

    out: dict[str, Path] = {}
    for name, preset in (
        (
            "llama-bf16",
            Preset(
                name="bench-llama",
                description="",
                arch="llama",
                hidden=2048,
                intermediate=5632,
                layers=layers,
                heads=16,
                kv_heads=4,
                vocab=32000,
                dtype="BF16",
                fill="values",
            ),
        ),
        (
            "llama-gptq",
            Preset(
                name="bench-gptq",
                description="",
                arch="llama",
                hidden=1024,
                intermediate=2816,
                layers=gptq_layers,
                heads=8,
                kv_heads=4,
                vocab=32000,
                gptq=True,
                fill="values",
            ),
        ),
    ):
        t0 = time.perf_counter()
        folder = work / name
        if (folder / "config.json").is_file() and shards(folder):  # kept from an earlier run
            out[name] = folder
            continue
        one = synthesize(work / f"{name}-one", preset)
        split(one, folder, max_shard_size=cap)
        for f in one.iterdir():
            if f.suffix == ".json" and not f.name.endswith("index.json"):
                shutil.copy(f, folder / f.name)
        shutil.rmtree(one)
        size = sum(p.stat().st_size for p in shards(folder))
        log(
            f"made {name}: {size / 1e9:.2f} GB in {len(shards(folder))} shards "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        out[name] = folder
    return out


# --------------------------------------------------------------------------- one route


class Sampler:
    """Peak RssAnon and VmRSS of this process, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.005) -> None:
        self.anon = 0
        self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)
                elif line.startswith("VmRSS:"):
                    self.rss = max(self.rss, int(line.split()[1]) * 1024)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """Run one route once and print its measurements as JSON on the last line."""
    import torch

    sys.path.insert(0, str(SRC))
    sampler = Sampler()
    folder = Path(args.model)
    files = shards(folder)
    cold = args.mode == "cold"
    gptq = "gptq" in folder.name
    dtype = torch.float16 if gptq else torch.bfloat16
    budget: Any = int(args.budget) if args.budget.isdigit() else args.budget
    streamer: Any = None
    t0 = time.perf_counter()
    evict(files)  # every route starts from an empty page cache and warms it itself
    from transformers import AutoModelForCausalLM, GPTQConfig, LogitsProcessorList

    kw: dict[str, Any] = {"dtype": dtype}
    if gptq:
        kw["quantization_config"] = GPTQConfig(
            bits=4, group_size=128, desc_act=False, sym=True, backend="gptq_torch"
        )
    if args.route == "ram":
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kw)
    elif args.route == "offload":
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            device_map="auto",
            max_memory={"cpu": budget},
            offload_folder=str(Path(args.out).with_suffix(".offload")),
            **kw,
        )
    else:
        import safeshard
        from safeshard.runtime.stream import streamer_of

        granularity: Literal["block", "module"] = (
            "module" if args.route == "stream-module" else "block"
        )
        model = safeshard.stream(
            safeshard.empty_model(folder, dtype=dtype),
            folder,
            max_resident_bytes=budget,
            granularity=granularity,
            experts=args.route != "stream-block",
        )
        streamer = streamer_of(model)
    model.eval()
    load_s = time.perf_counter() - t0
    offload_dir = Path(args.out).with_suffix(".offload")
    if offload_dir.is_dir():  # what the offload route wrote there is read back too: cold too
        files = files + sorted(p for p in offload_dir.rglob("*") if p.is_file())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (1, args.prompt), generator=gen)
    with torch.no_grad():
        model(ids[:, :DECODE_PROMPT])  # warm-up: compiles GPTQ kernels, learns the order
        if cold:
            evict(files)
        t = time.perf_counter()
        logits = model(ids).logits
        fwd_s = time.perf_counter() - t
        torch.save(logits.detach().clone(), args.out + ".logits.pt")
        del logits
        stamps: list[float] = []
        io: list[int] = []
        logical: list[int] = []

        def tick(input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            io.append(read_bytes())
            if streamer is not None:
                logical.append(streamer.stats.bytes_read)
            sampler.sample()
            if cold:
                evict(files)
            return scores

        if cold:
            evict(files)
        tokens = model.generate(
            ids[:, :DECODE_PROMPT],
            max_new_tokens=args.new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([tick]),
            pad_token_id=0,
        )
        torch.save(tokens, args.out + ".tokens.pt")
    sampler.stop()

    def per_step(xs: list[float] | list[int]) -> list[float]:
        return [float(b - a) for a, b in itertools.pairwise(xs)]

    decode = per_step(stamps)
    result = {
        "route": args.route,
        "mode": args.mode,
        "load_s": load_s,
        "forward_s": fwd_s,
        "decode_s": statistics.median(decode) if decode else None,
        "decode_all": decode,
        "read_per_token": statistics.median(per_step(io)) if decode else None,
        "logical_per_token": statistics.median(per_step(logical)) if logical[1:] else None,
        "peak_rss": max(status("VmHWM"), sampler.rss),
        "peak_anon": sampler.anon,
    }
    if streamer is not None:
        st = streamer.stats
        result.update(
            peak_held=st.peak_resident_bytes,
            resident_units=len(st.resident),
            units=len(streamer.units),
            model_bytes=streamer.model_bytes,
        )
        if st.experts is not None:
            x = st.experts
            result.update(
                expert_hit_rate=x.hits / x.used if x.used else None,
                expert_prefetched=x.prefetched,
                expert_prefetch_used=x.prefetch_used,
            )
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def run_child(
    route: str,
    mode: str,
    model: Path,
    out: Path,
    a: argparse.Namespace,
    budget: str,
    label: str,
) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(SRC) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TMPDIR=str(a.tmp),
        TORCHINDUCTOR_CACHE_DIR=str(a.tmp / "inductor"),
        TOKENIZERS_PARALLELISM="false",
    )
    if "gptq" in model.name:
        # gptq_torch compiles its dequantization per module, which takes minutes on a small
        # CPU and dominates every route equally: every GPTQ route runs it eagerly
        env["TORCH_COMPILE_DISABLE"] = "1"
    cmd = [
        PY,
        __file__,
        "--child",
        "--route",
        route,
        "--mode",
        mode,
        "--model",
        str(model),
        "--out",
        str(out),
        "--budget",
        budget,
        "--new-tokens",
        str(a.new_tokens),
        "--prompt",
        str(a.gptq_prompt if "gptq" in model.name else PROMPT),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "")[-1500:]
        log(f"  {label:<13} {mode:<4} FAILED ({proc.returncode}): {tail.strip().splitlines()[-1:]}")
        return {"route": label, "mode": mode, "error": tail}
    r: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    log(
        f"  {label:<13} {mode:<4} fwd {r['forward_s']:.2f} s  decode {r['decode_s']:.3f} s/token"
        f"  read {r['read_per_token'] / 1e6:.0f} MB/token  RSS {r['peak_rss'] / 1e6:.0f} MB"
        f"  anon {r['peak_anon'] / 1e6:.0f} MB  ({time.perf_counter() - t:.0f} s)"
    )
    return r


def equal_to(ref: Path, other: Path) -> bool | None:
    import torch

    if not (ref.is_file() and other.is_file()):
        return None
    return bool(torch.equal(torch.load(ref), torch.load(other)))


ROUTES = {
    "ram": ("ram", None),
    "offload": ("offload", None),
    "stream": ("stream", None),
    "stream-module": ("stream-module", None),
    "stream-small": ("stream-module", "small"),
    "stream-block": ("stream-block", None),
}
"""Label -> (route run by the child, budget: None for --budget, "small" for --small-budget)."""


def make_moe(work: Path, layers: int) -> Path:
    """The Mixtral-style MoE, saved by ``save_pretrained`` (reused if in ``work``)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    folder = work / "mixtral-moe"
    if (folder / "config.json").is_file() and shards(folder):
        return folder
    t0 = time.perf_counter()
    cfg = MixtralConfig(
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    del model
    size = sum(p.stat().st_size for p in shards(folder))
    log(
        f"made mixtral-moe: {size / 1e9:.2f} GB in {len(shards(folder))} shards "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return folder


def moe_budget(spec: str, folder: Path) -> str:
    """``spec`` as bytes: a size, or a percentage of the model's shards."""
    if spec.endswith("%"):
        size = sum(p.stat().st_size for p in shards(folder))
        return str(int(size * float(spec[:-1]) / 100))
    return spec


def bench_model(name: str, folder: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    routes = [("ram", "warm")]
    if name == "mixtral-moe":  # out of RAM only
        routes += [("offload", "cold"), ("stream", "cold"), ("stream-block", "cold")]
    else:
        for r in ["offload", "stream", *a.extra]:
            routes += [(r, "warm"), (r, "cold")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in routes}
    equal: dict[str, dict[str, bool | None]] = {}
    shown = a.moe_budget_bytes if name == "mixtral-moe" else a.budget
    log(
        f"{name}: {len(routes)} routes x {a.repeats} runs, budget "
        f"{a.gptq_budget if 'gptq' in name else shown}"
    )
    for rep in range(a.repeats):
        order = routes[rep % len(routes) :] + routes[: rep % len(routes)]
        for label, mode in order:
            out = work / f"{name}.{label}.{mode}.{rep}"
            route, which = ROUTES[label]
            budget = a.small_budget if which == "small" else a.budget
            if name == "mixtral-moe":
                budget = a.moe_budget_bytes
            if "gptq" in name:
                budget = a.gptq_small_budget if which == "small" else a.gptq_budget
            r = run_child(route, mode, folder, out, a, budget, label)
            runs[(label, mode)].append(r)
    for route, mode in routes:
        if route == "ram":
            continue
        same_logits: list[bool | None] = []
        same_tokens: list[bool | None] = []
        for rep in range(a.repeats):
            ref = work / f"{name}.ram.warm.{rep}"
            mine = work / f"{name}.{route}.{mode}.{rep}"
            same_logits.append(equal_to(Path(f"{ref}.logits.pt"), Path(f"{mine}.logits.pt")))
            same_tokens.append(equal_to(Path(f"{ref}.tokens.pt"), Path(f"{mine}.tokens.pt")))
        equal[f"{route}/{mode}"] = {
            "logits": None if None in same_logits else all(x for x in same_logits),
            "tokens": None if None in same_tokens else all(x for x in same_tokens),
        }
    summary: dict[str, Any] = {}
    for (route, mode), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[f"{route}/{mode}"] = {"error": rs[0].get("error", "")[-400:] if rs else ""}
            continue

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            xs = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(xs) if xs else None

        summary[f"{route}/{mode}"] = (
            {
                k: med(k)
                for k in (
                    "forward_s",
                    "decode_s",
                    "read_per_token",
                    "logical_per_token",
                    "peak_rss",
                    "peak_anon",
                    "peak_held",
                    "load_s",
                    "expert_hit_rate",
                )
            }
            | {"runs": len(ok)}
            | equal.get(f"{route}/{mode}", {})
        )
    return summary


def ratios(s: dict[str, Any]) -> dict[str, float]:
    def get(k: str, f: str) -> float | None:
        v = s.get(k, {}).get(f)
        return float(v) if isinstance(v, (int, float)) else None

    out: dict[str, float] = {}
    pairs = [
        ("decode warm: stream / ram", "stream/warm", "ram/warm", "decode_s"),
        ("decode warm: stream / offload", "stream/warm", "offload/warm", "decode_s"),
        ("decode cold: stream / offload", "stream/cold", "offload/cold", "decode_s"),
        ("forward cold: stream / offload", "stream/cold", "offload/cold", "forward_s"),
        ("peak RSS cold: stream / offload", "stream/cold", "offload/cold", "peak_rss"),
        ("decode cold: stream-module / offload", "stream-module/cold", "offload/cold", "decode_s"),
        (
            "read/token cold: stream / stream-block",
            "stream/cold",
            "stream-block/cold",
            "read_per_token",
        ),
        ("decode cold: stream / stream-block", "stream/cold", "stream-block/cold", "decode_s"),
        (
            "peak RSS cold: stream-module / offload",
            "stream-module/cold",
            "offload/cold",
            "peak_rss",
        ),
    ]
    for label, a, b, f in pairs:
        x, y = get(a, f), get(b, f)
        if x is not None and y:
            out[label] = round(x / y, 3)
    return out


def print_table(name: str, s: dict[str, Any], prompt: int) -> None:
    print(f"\n{name} (forward: {prompt} tokens)")
    print(
        f"{'route':<20} {'forward s':>9} {'decode s/tok':>12} {'read MB/tok':>11} "
        f"{'RSS MB':>7} {'anon MB':>7} {'logits':>6} {'tokens':>6}"
    )

    def f(v: Any, scale: float = 1.0, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v / scale, fmt)

    for k, v in s.items():
        if "error" in v:
            print(f"{k:<20} failed: {v['error'].strip().splitlines()[-1:] if v['error'] else ''}")
            continue
        print(
            f"{k:<20} {f(v['forward_s']):>9} {f(v['decode_s'], fmt='.3f'):>12} "
            f"{f(v['read_per_token'], 1e6, '.0f'):>11} {f(v['peak_rss'], 1e6, '.0f'):>7} "
            f"{f(v['peak_anon'], 1e6, '.0f'):>7} {v.get('logits', 'ref')!s:>6} "
            f"{v.get('tokens', 'ref')!s:>6}"
        )
    for label, r in ratios(s).items():
        print(f"  {label}: {r}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budget", default="500MB", help="max_resident_bytes and max_memory")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default 20, quick 6)")
    ap.add_argument("--gptq-layers", type=int, default=None, help="GPTQ blocks (12, quick 4)")
    ap.add_argument("--gptq-budget", default="100MB", help="budget for the GPTQ model")
    ap.add_argument("--gptq-small-budget", default="80MB", help="stream-small's, for GPTQ")
    ap.add_argument(
        "--gptq-prompt", type=int, default=32, help="tokens of the GPTQ forward pass measured"
    )
    ap.add_argument("--prompt", type=int, default=PROMPT, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None, help="runs per route (default 3)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 8)")
    ap.add_argument(
        "--models", default="llama-bf16,llama-gptq,mixtral-moe", help="which models to run"
    )
    ap.add_argument("--moe-layers", type=int, default=None, help="MoE blocks (8, quick 4)")
    ap.add_argument(
        "--moe-budget",
        default=None,
        help="MoE budget: a size or a % of the model (default 30%%; quick 45%%, as the floor, "
        "one layer's experts, is a larger share of a 4-layer model)",
    )
    ap.add_argument(
        "--small-budget",
        default="300MB",
        help="budget of the stream-small route (granularity='module')",
    )
    ap.add_argument(
        "--extra",
        default="stream-module,stream-small",
        help="more stream routes: stream-module (granularity='module' at --budget), "
        "stream-small (the same at --small-budget); '' for none",
    )
    ap.add_argument("--quick", action="store_true", help="6 layers, one run per route")
    ap.add_argument(
        "--keep", type=Path, help="work here and keep the files (models found there are reused)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--route", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return 0
    a.layers = a.layers or (6 if a.quick else 20)
    a.gptq_layers = a.gptq_layers or (4 if a.quick else 12)
    a.moe_layers = a.moe_layers or (4 if a.quick else 8)
    a.moe_budget = a.moe_budget or ("45%" if a.quick else "30%")
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.new_tokens = a.new_tokens or (4 if a.quick else 8)
    a.extra = [x for x in a.extra.split(",") if x]
    unknown = [x for x in a.extra if x not in ROUTES or x in ("ram", "offload", "stream")]
    if unknown:
        ap.error(f"--extra: unknown route(s) {unknown}")
    work = a.keep or Path(tempfile.mkdtemp(prefix="safeshard-stream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    a.tmp = work / "tmp"
    a.tmp.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "budget": a.budget,
        "gptq_budget": a.gptq_budget,
        "layers": a.layers,
        "gptq_layers": a.gptq_layers,
        "repeats": a.repeats,
    }
    try:
        names = a.models.split(",")
        models = (
            make_models(work, a.layers, a.gptq_layers, "500MB")
            if any(n != "mixtral-moe" for n in names)
            else {}
        )
        if "mixtral-moe" in names:
            models["mixtral-moe"] = make_moe(work, a.moe_layers)
            a.moe_budget_bytes = moe_budget(a.moe_budget, models["mixtral-moe"])
            results["moe_budget"] = int(a.moe_budget_bytes)
        for name in names:
            results[name] = bench_model(name, models[name], work, a)
            print_table(name, results[name], a.gptq_prompt if "gptq" in name else PROMPT)
            results[name + " ratios"] = ratios(results[name])
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
