"""The ``safeshard`` command line. ``print`` and ``exit`` live only in this package.

Each command lives in its own module and registers itself on :data:`main`.

Output. Every string a command prints passes through :func:`safe` (in ``_text``), which
shows control characters (C0, DEL, C1), bidi and other format characters, line
separators and lone surrogates as escapes (``\\x1b``, ``\\u202e``), so a tensor name,
metadata value, file name or message from a downloaded checkpoint cannot drive the
terminal or forge a line. The consoles :data:`out` and :data:`err` have rich markup and
emoji codes switched off, so ``[/]`` or ``:warning:`` in a name is printed as written;
:func:`line` builds a styled line from escaped parts. ``--json`` output is exact:
``json.dumps`` with ``ensure_ascii`` (every non-ASCII character and control character
as a ``\\uXXXX`` escape), so it is terminal-safe too and round-trips every name.

Exit codes, the same for every command (:func:`exit_code` is the one map; the command
group turns every exception into its code and a one-line message on stderr)::

    0    success (verify: no findings; diff: the same tensors and metadata)
    1    findings: verify found problems, diff found differences
    2    usage error: a bad option or argument, UsageError, SizeParseError
    3    input error: any other SafeshardError about the input or the request (a bad
         header or index, checkpoint not found or ambiguous, shards that disagree with
         their index, a plan that cannot keep the cap, output exists, update refused,
         memory budget, missing extra, ...)
    4    I/O error: StorageError (ReadError, WriteError and their subclasses),
         OutputLockedError, any other OSError
    70   a bug in safeshard (any other exception): an escaped traceback on stderr
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

# Commands register themselves on `main` when imported, one module per command.
from safeshard.cli import (
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
from safeshard.cli._text import safe
from safeshard.cli.app import (
    EXIT_BUG,
    EXIT_FINDINGS,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_USAGE,
    LOCATION,
    SIZE,
    SafeGroup,
    byte_progress,
    emit_json,
    err,
    exit_code,
    line,
    main,
    out,
    parse_storage_options,
    say,
    storage_option,
    warn,
)

__all__ = [
    "EXIT_BUG",
    "EXIT_FINDINGS",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_IO",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOCATION",
    "SIZE",
    "SafeGroup",
    "byte_progress",
    "demo_cmd",
    "diff_cmd",
    "emit_json",
    "err",
    "exit_code",
    "inspect_cmd",
    "line",
    "load_bench_cmd",
    "main",
    "merge_cmd",
    "out",
    "parse_storage_options",
    "run_cmd",
    "safe",
    "say",
    "split_cmd",
    "storage_option",
    "synth_cmd",
    "verify_cmd",
    "warn",
]
