"""The command group and what every command shares: options, output, exit codes.

The package docstring (:mod:`safeshard.cli`) documents the output rules and the exit
codes; each command module imports what it needs from here and registers itself on
:data:`main`.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
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
from rich.text import Text

from safeshard import __version__
from safeshard.cli._text import safe
from safeshard.errors import (
    OutputLockedError,
    SafeshardError,
    SizeParseError,
    StorageError,
    UsageError,
)
from safeshard.io.remote import is_url
from safeshard.io.store import storage_error
from safeshard.io.storerr import from_client
from safeshard.redact import redact, secrets_of_options, secrets_of_url, secrets_shown_never
from safeshard.sizes import parse_size

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_IO = 4
EXIT_BUG = 70
EXIT_INTERRUPTED = 130


def _silence_stdout() -> None:
    """After a broken pipe (``safeshard ... | head``), let the exit flush go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests, IDEs)
        pass


class _Console(Console):
    """A rich console whose broken pipe exits with the I/O code (rich's own exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _silence_stdout()
        raise SystemExit(EXIT_IO)


out = _Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


class _NoSuchError(click.UsageError):
    """Never raised: stands in for an exception class this click version lacks."""


_NoArgsIsHelp: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _NoSuchError)
"""click's "no arguments: show the help" error (click >= 8.2); its message is the help."""

Part = str | tuple[str, str]
"""A piece of a :func:`line`: text, or ``(text, style)``."""


def line(*parts: Part) -> Text:
    """One line of output from ``parts``, each escaped by :func:`safe`.

    A part is a string or a ``(string, rich style)`` pair; the style comes from the
    code, never from the text, and no part is read as markup.
    """
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(safe(part[0]), style=part[1])
        else:
            text.append(safe(part))
    return text


def say(*parts: Part) -> None:
    """Print one :func:`line` on stdout."""
    out.print(line(*parts))


def warn(message: str, label: str = "warning") -> None:
    """Print ``label: message`` on stderr, the message escaped."""
    err.print(line((f"{label}:", "yellow"), " ", message))


def secrets_of_args(args: Sequence[str]) -> list[str]:
    """The credentials in a command line: the userinfo and credential query parameters
    of every URL in it, and the credential values of ``--storage-option`` pairs. While
    the command runs they are masked wherever they would be shown
    (:func:`safeshard.redact.secrets_shown_never`)."""
    found: list[str] = []
    for i, arg in enumerate(args):
        found += secrets_of_url(arg)
        pair = None
        if arg.startswith("--storage-option="):
            pair = arg.partition("=")[2]
        elif arg == "--storage-option" and i + 1 < len(args):
            pair = args[i + 1]
        if pair is not None:
            key, _, value = pair.partition("=")
            found += secrets_of_options({key.rsplit(".", 1)[-1]: value})
    return found


def as_safeshard_error(e: BaseException, urls: Sequence[str] = ()) -> BaseException:
    """``e``, or the :class:`SafeshardError` it stands for when a storage client raised it
    past the library's own translation (so no storage error is ever shown as a bug);
    ``urls`` are the command's URL arguments, named in its message."""
    if isinstance(e, (SafeshardError, click.exceptions.Exit, click.ClickException)):
        return e
    if not isinstance(e, Exception) or not from_client(e):
        return e
    return storage_error(e, url=" or ".join(urls) or None)


def exit_code(e: BaseException) -> int:
    """The exit code for an exception that ended a command (the map in this module's doc)."""
    if isinstance(e, (KeyboardInterrupt, click.exceptions.Abort)):
        return EXIT_INTERRUPTED
    if isinstance(e, (click.ClickException, UsageError, SizeParseError)):
        return EXIT_USAGE
    if isinstance(e, (StorageError, OutputLockedError)):
        return EXIT_IO
    if isinstance(e, SafeshardError):
        return EXIT_INPUT
    if isinstance(e, OSError):
        return EXIT_IO
    return EXIT_BUG


def error_message(e: BaseException) -> str:
    """The text shown for ``e`` (not yet escaped)."""
    if isinstance(e, SafeshardError):
        return str(e)
    if isinstance(e, OSError):
        why = e.strerror or str(e) or type(e).__name__
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        return ": ".join([*names, why]) if names else why
    return str(e) or type(e).__name__


def report(e: BaseException, code: int) -> None:
    """Tell the user on stderr why the command ended with ``code``."""
    if code == EXIT_INTERRUPTED:
        err.print(line(("error:", "bold red"), " interrupted"))
    elif isinstance(e, _NoArgsIsHelp):  # `safeshard` alone: the help text, as click shows it
        for text in e.format_message().splitlines():
            err.print(safe(text))
    elif isinstance(e, click.ClickException):
        if isinstance(e, click.UsageError) and e.ctx is not None:
            for text in e.ctx.get_usage().splitlines():
                err.print(safe(text))
            if e.ctx.command.get_help_option(e.ctx) is not None:
                names = e.ctx.command.get_help_option_names(e.ctx)
                err.print(safe(f"Try '{e.ctx.command_path} {max(names, key=len)}' for help."))
            err.print()
        err.print(line("Error: ", e.format_message()))
    elif code == EXIT_BUG:
        _report_bug(e)
    else:
        err.print(line(("error:", "bold red"), " ", error_message(e)))


def _report_bug(e: BaseException) -> None:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in reversed(chain):
        err.print("Traceback (most recent call last):")
        for chunk in traceback.format_tb(exc.__traceback__):
            for text in chunk.splitlines():
                err.print(safe(text))
        err.print(safe(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"))
    err.print(
        line(("error:", "bold red"), " a bug in safeshard; please report it with the lines above")
    )


class SafeGroup(click.Group):
    """The command group: runs a command and maps whatever ends it to an exit code.

    In standalone mode (the ``safeshard`` script, ``python -m safeshard``, click's test
    runner) every exception is turned into its code by :func:`exit_code` and shown by
    :func:`report`, escaped; click's own usage errors included.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        with secrets_shown_never(secrets_of_args(argv)):
            if not standalone_mode:
                return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            try:
                rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            except SystemExit:
                raise
            except BaseException as e:
                e = as_safeshard_error(e, [a for a in argv if is_url(a)])
                code = exit_code(e)
                report(e, code)
                sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            # `safeshard ... | head`: the reader went away, so there is no one to tell;
            # exit here, before click's own handler turns it into exit code 1
            _silence_stdout()
            sys.exit(EXIT_IO)


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
    """Print ``obj`` as JSON on stdout.

    ``ensure_ascii`` stays on: the output is pure ASCII, every control character,
    bidi mark and lone surrogate of a name written as a ``\\uXXXX`` escape, and
    ``json.loads`` gives back the exact strings.
    """
    text = json.dumps(_redacted(obj), indent=2, sort_keys=False, default=str, ensure_ascii=True)
    click.echo(text)


def _redacted(obj: Any) -> Any:
    """``obj`` with credentials masked in every string (:func:`safeshard.redact.redact`)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {_redacted(k): _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redacted(v) for v in obj]
    if isinstance(obj, (int, float, bool)) or obj is None:
        return obj
    return redact(str(obj))


def quiet_option(fn: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes.")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


LOCATION = click.Path(path_type=str)
"""A path or a URL (``s3://bucket/prefix``, ``memory://...``): kept as written."""


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs as fsspec storage options. A dotted key nests
    (``client_kwargs.region_name=eu-west-1``); a value that parses as JSON (``true``,
    ``8``, ``{"a": 1}``) is that value, any other is the string."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(
                f"--storage-option {pair!r} is not KEY=VALUE, e.g. endpoint_url=http://host:9000"
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option {key!r}: {part!r} is set to a value already")
        node[leaf] = value
    return out


def storage_option(fn: F) -> F:
    """``--storage-option KEY=VALUE`` (repeatable): passed to fsspec for URL paths.
    The command receives ``storage_options`` (a dict, or None)."""

    def convert(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
        return parse_storage_options(value)

    return click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=convert,
        help="An fsspec storage option for URL paths (s3://...), e.g. "
        "endpoint_url=http://127.0.0.1:9000 or anon=true; repeatable. Credentials also "
        "come from the environment and the AWS config, and are never printed.",
    )(fn)


@contextmanager
def byte_progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar by bytes on stderr, shown only on a terminal and not ``quiet``.

    Yields a callback that takes a number of bytes just done. ``label`` is escaped
    and never read as markup.
    """
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(safe(label), total=total)
        yield lambda n: progress.advance(task, n)


@click.group(cls=SafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safeshard")
def main() -> None:
    """Split, merge, verify and load large safetensors checkpoints.

    Shards keep whole transformer layers together, every file (header included)
    stays under the cap, and tensor bytes are streamed, never loaded.
    """
