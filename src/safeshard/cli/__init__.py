"""The ``safeshard`` command line. ``print`` and ``exit`` live only in this package.

Each command lives in its own module and registers itself on :data:`main`.
Exit codes: 0 success, 1 the operation failed (or, for ``verify``, findings),
2 a usage error.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import __version__
from ..errors import SafeshardError, SizeParseError
from ..sizes import parse_size

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class SizeType(click.ParamType):  # type: ignore[type-arg]
    """A click parameter for size strings (``4GB``, ``500MiB``, ``fat32``, bytes)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except SizeParseError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def fail(message: str, code: int = 1) -> None:
    """Print an error on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    sys.exit(code)


def handle_errors(code: int = 1) -> Callable[[F], F]:
    """Turn a SafeshardError or OSError into a one-line message and exit ``code``."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except SafeshardError as e:
                fail(_escape(str(e)), code)
            except KeyboardInterrupt:
                fail("interrupted; nothing half-written was left behind", 130)
            except OSError as e:
                fail(_escape(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")), code)
            return None

        return wrapper  # type: ignore[return-value]

    return deco


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def quiet_option(fn: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes.")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


@contextmanager
def byte_progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar by bytes on stderr, shown only on a terminal and not ``quiet``.

    Yields a callback that takes a number of bytes just done.
    """
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safeshard")
def main() -> None:
    """Split, merge, verify and load large safetensors checkpoints.

    Shards keep whole transformer layers together, every file (header included)
    stays under the cap, and tensor bytes are streamed, never loaded.
    """


# Commands register themselves on `main` when imported, one module per command.
from . import (  # noqa: E402
    demo_cmd,
    diff_cmd,
    inspect_cmd,
    load_bench_cmd,
    merge_cmd,
    run_cmd,
    split_cmd,
    synth_cmd,
    verify_cmd,
)

__all__ = [
    "SIZE",
    "byte_progress",
    "demo_cmd",
    "diff_cmd",
    "emit_json",
    "fail",
    "handle_errors",
    "inspect_cmd",
    "load_bench_cmd",
    "main",
    "merge_cmd",
    "run_cmd",
    "split_cmd",
    "synth_cmd",
    "verify_cmd",
]
