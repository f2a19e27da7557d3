"""``safeshard synth``: write a synthetic checkpoint folder from a preset."""

from __future__ import annotations

import os
import time

import click

from safeshard.cli.app import byte_progress, emit_json, json_option, main, quiet_option, say
from safeshard.ops.synth import FLOAT_DTYPES, PRESETS, expected_size, synthesize, weights_name

_PRESET_HELP = "\n".join(f"  {name:<18} {p.description}" for name, p in PRESETS.items())


@main.command(
    "synth",
    epilog="\b\nPresets:\n" + _PRESET_HELP,
    help="""Write a synthetic checkpoint folder OUT_DIR from a preset.

    The folder looks like a real one: the weights (AutoGPTQ's gptq_model-4bit-128g.safetensors
    for GPTQ presets with AutoGPTQ's __metadata__, model.safetensors otherwise), config.json
    (with quantization_config for GPTQ), quantize_config.json, generation_config.json and a
    tiny byte-level tokenizer. The same preset, layers and seed give byte-identical files.
    Tiny presets hold sensible values and load in transformers (tiny-gptq through GPTQModel);
    the Llama-2 presets hold random bytes, streamed with bounded memory.

    \b
    Examples:
      safeshard synth /tmp/tiny --preset tiny-gptq
      safeshard synth /tmp/13b --preset llama-2-13b-gptq
      safeshard synth /tmp/13b-2 --preset llama-2-13b-gptq --layers 2 --seed 7 --json
    """,
)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--preset",
    "-p",
    required=True,
    type=click.Choice(list(PRESETS)),
    help="Model family and size (listed below).",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Override the preset's number of transformer blocks.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the tensor bytes.")
@click.option(
    "--dtype",
    type=click.Choice(list(FLOAT_DTYPES)),
    default=None,
    help="Float type of a non-quantized preset (default F16).",
)
@click.option("--force", is_flag=True, help="Replace weights already in OUT_DIR.")
@quiet_option
@json_option
def synth_cmd(
    out_dir: str,
    preset: str,
    layers: int | None,
    seed: int,
    dtype: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    p = PRESETS[preset]
    total = expected_size(preset, layers)
    started = time.perf_counter()
    with byte_progress(total, f"synth {preset}", quiet or as_json) as advance:
        folder = synthesize(
            out_dir, preset, layers=layers, seed=seed, dtype=dtype, force=force, progress=advance
        )
    seconds = time.perf_counter() - started
    weights = folder / weights_name(p)
    n_layers = p.layers if layers is None else layers
    if as_json:
        emit_json(
            {
                "folder": str(folder),
                "weights": str(weights),
                "preset": preset,
                "layers": n_layers,
                "seed": seed,
                "dtype": dtype or ("GPTQ" if p.gptq else p.dtype),
                "file_size": os.path.getsize(weights),
                "files": sorted(f.name for f in folder.iterdir()),
                "seconds": round(seconds, 3),
            }
        )
    elif not quiet:
        say(
            f"wrote {weights} ({os.path.getsize(weights):,} bytes, {n_layers} layers, "
            f"seed {seed}) in {seconds:.1f} s"
        )
