"""``safeshard run``: greedy generation with the weights streamed under a memory budget."""

from __future__ import annotations

import itertools
import time
from typing import Any

import click

from ..errors import UsageError
from ..membudget import AutoBudget
from ..sizes import format_size
from . import SIZE, emit_json, json_option, main, out, quiet_option


class BudgetType(click.ParamType):  # type: ignore[type-arg]
    """A size (``500MB``, bytes) or ``auto``."""

    name = "SIZE|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, AutoBudget)):
            return value
        if str(value).strip().lower() == "auto":
            return "auto"
        return SIZE.convert(value, param, ctx)


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(
            f"--prompt-ids must be comma-separated token ids such as 1,15,72, not {text[:40]!r}"
        ) from None
    if not ids or min(ids) < 0:
        raise UsageError("--prompt-ids needs at least one non-negative token id")
    return ids


@main.command(
    "run",
    help="""Generate from the checkpoint at PATH with its weights streamed under a budget.

    The model is built on the meta device from PATH's config.json (GPTQ checkpoints through
    transformers' GPTQ integration), then each block is read from the shards just before it
    runs and released after, while the next one is read ahead (safeshard.stream). Prints
    the tokens generated greedily, the time per token, the bytes read per token and the most
    memory held at once.

    \b
    Examples:
      safeshard synth /tmp/tiny --preset tiny-llama
      safeshard run /tmp/tiny --prompt-ids 1,15,72,101 --max-resident 600KB
      safeshard demo --keep /tmp/demo
      safeshard run /tmp/demo/tiny-gptq-sharded --prompt-ids 1,15,72 --max-resident 1MB --json
    """,
)
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option(
    "--prompt-ids", required=True, help="The prompt as comma-separated token ids, e.g. 1,15,72."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--max-resident",
    "budget",
    type=BudgetType(),
    default=None,
    help="Most bytes of weights held at once (e.g. 500MB), or 'auto' to follow the memory "
    "available. Default: no limit.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Units read ahead of the one running.",
)
@click.option(
    "--granularity",
    type=click.Choice(["block", "module"]),
    default="block",
    show_default=True,
    help="Stream whole blocks, or each module of a block.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Compute dtype (auto: the config's).",
)
@quiet_option
@json_option
def run_cmd(
    path: str,
    prompt_ids: str,
    max_new_tokens: int,
    budget: Any,
    prefetch: int,
    granularity: str,
    dtype: str,
    quiet: bool,
    as_json: bool,
) -> None:
    from ..load import import_torch
    from ..stream import empty_model, stream, streamer_of

    torch = import_torch()
    ids = _ids(prompt_ids)
    model = empty_model(path, dtype=None if dtype == "auto" else getattr(torch, dtype))
    vocab = model.get_input_embeddings().num_embeddings
    if max(ids) >= vocab:
        raise UsageError(f"--prompt-ids: id {max(ids)} is not below the vocabulary size {vocab}")
    model = stream(
        model,
        path,
        max_resident_bytes=budget,
        prefetch=prefetch,
        granularity=granularity,  # type: ignore[arg-type]
    )
    streamer = streamer_of(model)
    stamps: list[float] = []
    reads: list[int] = []

    def tick(input_ids: Any, scores: Any) -> Any:
        stamps.append(time.perf_counter())
        reads.append(streamer.stats.bytes_read)
        return scores

    from transformers import LogitsProcessorList

    started = time.perf_counter()
    try:
        with torch.no_grad():
            result = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([tick]),
                pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0,
            )
        stats = streamer.stats
    finally:
        streamer.close()
    new = result[0, len(ids) :].tolist()
    prefill = stamps[0] - started if stamps else 0.0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    per_token = sorted(steps)[len(steps) // 2] if steps else None
    read_steps = [b - a for a, b in itertools.pairwise(reads)]
    bytes_per_token = sum(read_steps) // len(read_steps) if read_steps else None
    report = {
        "path": path,
        "prompt_ids": ids,
        "new_token_ids": new,
        "prefill_seconds": round(prefill, 4),
        "decode_seconds_per_token": None if per_token is None else round(per_token, 4),
        "bytes_read_per_token": bytes_per_token,
        "bytes_read": stats.bytes_read,
        "model_bytes": streamer.model_bytes,
        "budget": stats.budget,
        "peak_resident_bytes": stats.peak_resident_bytes,
        "resident_units": stats.resident,
        "units": len(streamer.units),
    }
    if as_json:
        emit_json(report)
        return
    out.print(" ".join(str(t) for t in new))
    if quiet:
        return
    budget_text = "no limit" if stats.budget is None else format_size(stats.budget)
    out.print(
        f"{len(new)} new tokens; prefill {prefill:.2f} s"
        + (f", {per_token:.3f} s per token after" if per_token is not None else "")
    )
    out.print(
        f"weights {format_size(streamer.model_bytes)} in {len(streamer.units)} units; budget "
        f"{budget_text}; most held at once {format_size(stats.peak_resident_bytes)}; "
        f"{len(stats.resident)} unit(s) resident"
    )
    if bytes_per_token is not None:
        out.print(f"read per token: {format_size(bytes_per_token)}")
