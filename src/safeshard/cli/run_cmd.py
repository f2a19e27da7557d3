"""``safeshard run``: greedy generation with the weights streamed under a memory budget."""

from __future__ import annotations

import itertools
import time
from typing import Any

import click

from safeshard.cli._text import safe
from safeshard.cli.app import SIZE, emit_json, json_option, main, out, quiet_option
from safeshard.errors import UsageError
from safeshard.runtime.membudget import AutoBudget
from safeshard.runtime.readers import import_torch
from safeshard.runtime.stream import empty_model, stream, streamer_of
from safeshard.runtime.textgen import TextStreamer, load_tokenizer
from safeshard.runtime.textgen import prompt_ids as encode
from safeshard.sizes import format_size


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

    PROMPT is text, turned into tokens by the tokenizer saved in PATH's folder (through its
    chat template, as one user message, when it has one); the new text is printed as it
    is generated. Or give the prompt as token ids with --prompt-ids.

    The model is built on the meta device from PATH's config.json (the head its
    architectures name; GPTQ checkpoints through transformers' GPTQ integration), then
    each block is read from the shards just before it runs and released after, while the
    next one is read ahead (safeshard.stream). A last line gives tokens/s, the bytes read
    per token and the most memory held at once. `safeshard inspect PATH` says which
    budgets work.

    \b
    Examples:
      safeshard run ./my-model "Write a haiku about disks" --max-new-tokens 40
      safeshard synth /tmp/tiny --preset tiny-llama
      safeshard run /tmp/tiny --prompt-ids 1,15,72,101 --max-resident 600KB
      safeshard demo --keep /tmp/demo
      safeshard run /tmp/demo/tiny-gptq-sharded --prompt-ids 1,15,72 --max-resident 1MB --json
    """,
)
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.argument("prompt", required=False)
@click.option(
    "--prompt-ids", default=None, help="The prompt as comma-separated token ids, e.g. 1,15,72."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--max-resident",
    "budget",
    type=BudgetType(),
    default="auto",
    show_default=True,
    help="Most bytes of weights held at once (e.g. 500MB), or 'auto' to follow the memory "
    "available.",
)
@click.option(
    "--chat-template/--no-chat-template",
    "chat",
    default=None,
    help="Wrap PROMPT in the tokenizer's chat template (default: when it has one).",
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
    prompt: str | None,
    prompt_ids: str | None,
    max_new_tokens: int,
    budget: Any,
    chat: bool | None,
    prefetch: int,
    granularity: str,
    dtype: str,
    quiet: bool,
    as_json: bool,
) -> None:

    torch = import_torch()
    if (prompt is None) == (prompt_ids is None):
        raise UsageError('give the prompt as text (safeshard run PATH "text") or --prompt-ids')
    tokenizer = None
    if prompt is not None:
        tokenizer = load_tokenizer(path)
        ids = encode(tokenizer, prompt, chat=chat)
    else:
        ids = _ids(prompt_ids or "")
    model = empty_model(path, dtype=None if dtype == "auto" else getattr(torch, dtype))
    vocab = model.get_input_embeddings().num_embeddings
    if max(ids) >= vocab:
        what = "--prompt-ids" if tokenizer is None else "the tokenizer"
        raise UsageError(f"{what}: id {max(ids)} is not below the vocabulary size {vocab}")
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

    text_out = TextStreamer(tokenizer, _show) if tokenizer is not None and not as_json else None
    gen = model.generation_config
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    started = time.perf_counter()
    try:
        with torch.no_grad():
            result = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([tick]),
                pad_token_id=pad if pad is not None else 0,
                streamer=text_out,
            )
        elapsed = time.perf_counter() - started
        stats = streamer.stats
    finally:
        streamer.close()
    if text_out is not None:
        out.print()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    new = result[0, 1:].tolist() if encoder_decoder else result[0, len(ids) :].tolist()
    tokens_per_second = len(new) / elapsed if elapsed > 0 else None
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
        "tokens_per_second": None if tokens_per_second is None else round(tokens_per_second, 3),
        "resident_units": stats.resident,
        "units": len(streamer.units),
    }
    if tokenizer is not None:
        report["prompt"] = prompt
        report["text"] = tokenizer.decode(new, skip_special_tokens=True)
    if as_json:
        emit_json(report)
        return
    if tokenizer is None:
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
    speed = f"{tokens_per_second:.2f} tokens/s" if tokens_per_second is not None else "-"
    per = format_size(bytes_per_token) if bytes_per_token is not None else "-"
    out.print(
        f"{len(new)} tokens in {elapsed:.2f} s: {speed}; read per token {per}; "
        f"peak held {format_size(stats.peak_resident_bytes)}"
    )


def _show(piece: str) -> None:
    """Print generated text as it comes: escaped, line breaks kept as line breaks."""
    out.print("\n".join(safe(part) for part in piece.split("\n")), end="")
