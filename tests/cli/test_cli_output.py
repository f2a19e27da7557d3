"""The CLI's human output is terminal-safe; its ``--json`` output is exact.

A checkpoint whose tensor names, metadata, shard names, folder names and sidecar file
names carry terminal escapes (ESC [ 31m, an OSC title ending in BEL, the C1 CSI
U+009B), newlines, CR, tab, DEL, bidi overrides, zero-width characters, a byte that is
not UTF-8 (a lone surrogate in the path), rich markup and emoji codes goes through
every command. No raw control character may reach stdout or stderr, and each name
must be visible in its escaped form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import safeshard
from conftest import write_st
from safeshard.cli import main

# raw tensor name -> how the human output must show it (written out by hand)
NAMES = {
    "a\x1b[31mred": r"a\x1b[31mred",
    "b\x1b]0;title\x07": r"b\x1b]0;title\x07",
    "c\x9b31m": r"c\x9b31m",
    "d\nforged: line": r"d\nforged: line",
    "e\r\tcr-tab\x7fdel": r"e\r\tcr-tab\x7fdel",
    "f\u202eevil\u2066\u200b\u2028": r"f\u202eevil\u2066\u200b\u2028",
    "[bold red]x[/] :warning:": "[bold red]x[/] :warning:",
    "[/]": "[/]",
}
META = {"format": "pt", "k\x1b[2J": "v\x9b[/]", "[b]i\u202e": "\ttab\n"}
META_SHOWN = [r"k\x1b[2J=v\x9b[/]", r"[b]i\u202e=\ttab\n"]
BASE = "[bold]m\x1b[31m\u202e"
BASE_SHOWN = r"[bold]m\x1b[31m\u202e"
SIDECAR = "notes\x1b[31m.md"
ROOT = "dir\x1b]0;t\x07\udcff"  # \udcff: the byte 0xff, not UTF-8 (os.fsdecode's escape)
ROOT_SHOWN = r"dir\x1b]0;t\x07\udcff"

FORBIDDEN = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069"
    "\ufeff\ud800-\udfff]"
)
"""C0 controls except the newline that ends a line, DEL, C1, soft hyphen, bidi and
zero-width marks, line/paragraph separators, BOM and lone surrogates."""


def assert_terminal_safe(text: str) -> None:
    bad = sorted({f"U+{ord(c):04X}" for c in FORBIDDEN.findall(text)})
    assert not bad, f"raw control characters {bad} in:\n{text!r}"


def tensors(layers: int = 2) -> dict[str, tuple[str, list[int]]]:
    t: dict[str, tuple[str, list[int]]] = {}
    for i in range(layers):
        t[f"model.layers.{i}.mlp.weight"] = ("F16", [8, 4])
    for j, name in enumerate(NAMES):
        t[name] = ("F16", [4 + j])
    return t


def fill_changed(name: str, n: int) -> bytes:
    """Different bytes for the hostile tensors, the same for the others."""
    return (b"\x07" if name in NAMES else b"\x01") * n


@dataclass
class World:
    root: Path
    src: Path
    new: Path
    out: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("cli") / ROOT
    src = root / "src\u202e[/]"
    write_st(src / "model.safetensors", tensors(), META, fill=lambda name, n: b"\x01" * n)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / SIDECAR).write_text("hello\n")
    new = root / "new"
    write_st(new / "model.safetensors", tensors(), {**META, "format": "np"}, fill=fill_changed)
    out = root / "out"
    safeshard.split(src, out, max_shard_size=300, name=BASE)
    return World(root, src, new, out)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})


@dataclass(frozen=True)
class Case:
    args: Callable[[World, Path], list[str | Path]]
    code: int
    shown: tuple[str, ...]
    """Escaped fragments that must appear in stdout + stderr."""


ALL_NAMES = tuple(NAMES.values())

CASES = {
    "inspect": Case(lambda w, t: ["inspect", w.src], 0, (ROOT_SHOWN, *ALL_NAMES, *META_SHOWN)),
    "split-dry-run": Case(
        lambda w, t: ["split", w.src, t / ROOT / "o", "-s", "300", "--name", BASE, "--dry-run"],
        0,
        (ROOT_SHOWN, BASE_SHOWN, *ALL_NAMES),
    ),
    "split": Case(
        lambda w, t: ["split", w.src, t / ROOT / "o", "-s", "300", "--name", BASE],
        0,
        (ROOT_SHOWN, BASE_SHOWN, r"notes\x1b[31m.md", *ALL_NAMES),
    ),
    "split-oversize-warning": Case(
        lambda w, t: ["split", w.src, t / "o", "-s", "150", "--allow-oversize", "--dry-run"],
        0,
        (r"a\x1b[31mred", "[bold red]x[/] :warning:"),
    ),
    "split-update": Case(
        lambda w, t: ["split", w.new, _copy_out(w, t), "--update"],
        0,
        (ROOT_SHOWN, BASE_SHOWN, *list(NAMES.values())[:6]),
    ),
    "merge": Case(
        lambda w, t: ["merge", w.out, _merge_target(t)],
        0,
        (ROOT_SHOWN, r"m\x1b[31m.safetensors"),
    ),
    "verify-findings": Case(
        lambda w, t: ["verify", w.out, "--against", w.new], 1, (ROOT_SHOWN, *ALL_NAMES)
    ),
    "verify-corrupt-shard": Case(
        lambda w, t: ["verify", _corrupt_out(w, t)], 1, (ROOT_SHOWN, BASE_SHOWN)
    ),
    "diff": Case(
        lambda w, t: ["diff", w.src, w.new],
        1,
        (*ALL_NAMES, r"'k\x1b[2J': 'v\x9b[/]'"),
    ),
    "diff-shards": Case(lambda w, t: ["diff", w.src, w.out], 0, (BASE_SHOWN,)),
    "synth": Case(
        lambda w, t: ["synth", t / ROOT / "s\u202e", "-p", "tiny-llama", "--layers", "1"],
        0,
        (ROOT_SHOWN, r"s\u202e"),
    ),
    "error-missing-path": Case(
        lambda w, t: ["inspect", w.root / "nope\x1b[31m\n"], 3, (ROOT_SHOWN, r"nope\x1b[31m\n")
    ),
    "error-bad-header": Case(
        lambda w, t: ["split", _bad_file(t), t / "o"], 3, (ROOT_SHOWN, r"bad\x9b.safetensors")
    ),
    "error-split-name": Case(
        lambda w, t: ["split", w.src, t / "o", "--name", "[/]x\x1b[31m"], 2, (r"[/]x\x1b[31m",)
    ),
    "error-demo": Case(lambda w, t: ["demo", "--keep", _a_file(t) / "k\x1b[31m"], 4, (ROOT_SHOWN,)),
    # click's own messages: it strips ESC [ sequences (when not on a terminal) and
    # quotes some values with repr, but not an extra argument
    "error-click-extra-argument": Case(
        lambda w, t: ["inspect", w.src, "b\x9b31m\u202e\n\x1b]0;x\x07"],
        2,
        (r"b\x9b31m\u202e\n\x1b]0;x\x07",),
    ),
}


def _merge_target(t: Path) -> Path:
    (t / ROOT).mkdir(parents=True, exist_ok=True)
    return t / ROOT / "m\x1b[31m.safetensors"


def _copy_out(w: World, t: Path) -> Path:
    out = t / ROOT / "upd"
    safeshard.split(w.src, out, max_shard_size=300, name=BASE)
    return out


def _corrupt_out(w: World, t: Path) -> Path:
    import shutil

    out = t / ROOT / "bad"
    shutil.copytree(w.out, out)
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return out


def _bad_file(t: Path) -> Path:
    bad = t / ROOT / "bad\x9b.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes((1000).to_bytes(8, "little") + b"{}")
    return bad


def _a_file(t: Path) -> Path:
    f = t / ROOT / "file"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("x")
    return f


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_human_output_is_terminal_safe(world: World, tmp_path: Path, case: Case) -> None:
    res = invoke(*case.args(world, tmp_path))
    text = res.stdout + res.stderr
    assert res.exit_code == case.code, text
    assert_terminal_safe(res.stdout)
    assert_terminal_safe(res.stderr)
    missing = [s for s in case.shown if s not in text]
    assert not missing, f"not shown escaped: {missing}\n{text}"
    assert "Traceback" not in text
    # a newline inside a name never starts a line of its own
    assert not any(line.startswith(("forged", "tab")) for line in text.splitlines())


def test_verify_table_on_a_wide_terminal_is_terminal_safe(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 120 columns or more, findings are a rich table; its cells are escaped too."""
    from safeshard import cli

    monkeypatch.setattr(cli.out, "width", 200)
    res = invoke("verify", world.out, "--against", world.new)
    assert res.exit_code == 1
    assert_terminal_safe(res.stdout)
    assert "┃ code" in res.stdout  # the table, not the narrow layout
    assert "[/]" in res.stdout and r"\x1b[31m" in res.stdout


@pytest.mark.slow
def test_load_bench_output_is_terminal_safe(world: World) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    res = invoke("load-bench", world.src, "--warm", "--variant", "sequential")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert_terminal_safe(res.stdout)
    assert_terminal_safe(res.stderr)
    assert ROOT_SHOWN in res.stdout


def test_split_name_with_markup_is_an_error_not_a_crash(world: World, tmp_path: Path) -> None:
    """``split tiny out --name '[/]x'`` used to end in rich.errors.MarkupError."""
    res = invoke("split", world.src, tmp_path / "out", "--name", "[/]x")
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith("error: --name '[/]x' is not a usable base name")
    assert "Traceback" not in res.stderr and "MarkupError" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_markup_in_a_base_name_is_printed_as_written(world: World, tmp_path: Path) -> None:
    res = invoke("split", world.src, tmp_path / "out", "-s", "300", "--name", "[bold]m[red]")
    assert res.exit_code == 0, res.stderr
    assert "[bold]m[red]-00001-of-" in res.stdout
    assert "index: [bold]m[red].safetensors.index.json" in res.stdout
    assert (tmp_path / "out" / "[bold]m[red].safetensors.index.json").is_file()


def test_emoji_codes_in_names_are_not_replaced(world: World) -> None:
    res = invoke("inspect", world.src)
    assert ":warning:" in res.stdout
    assert "\u26a0" not in res.stdout


# --------------------------------------------------------------------------- --json


def _json(*args: str | Path, code: int = 0) -> dict[str, object]:
    res = invoke(*args, "--json")
    assert res.exit_code == code, res.stdout + res.stderr
    assert res.stdout.isascii()  # ensure_ascii: every control and non-ASCII char escaped
    assert_terminal_safe(res.stdout)
    obj = json.loads(res.stdout)
    assert isinstance(obj, dict)
    return obj


def test_inspect_json_round_trips_hostile_names(world: World) -> None:
    j = _json("inspect", world.src)
    assert j["path"] == str(world.src)
    assert j["metadata"] == META
    outside = j["outside_blocks"]
    assert isinstance(outside, list)
    assert set(NAMES) <= {t["name"] for t in outside}


def test_split_json_round_trips_hostile_names(world: World, tmp_path: Path) -> None:
    out = tmp_path / ROOT / "o"
    j = _json("split", world.src, out, "-s", "300", "--name", BASE)
    assert j["source"] == str(world.src)
    assert j["out_dir"] == str(out)
    shards = j["shards"]
    assert isinstance(shards, list)
    written = sorted(p.name for p in out.iterdir() if p.name.startswith(f"{BASE}-"))
    assert [s["file"] for s in shards] == written and len(written) > 1
    assert j["index"] == f"{BASE}.safetensors.index.json"
    assert SIDECAR in j["copied"]  # type: ignore[operator]
    blocks = ", ".join(s["blocks"] for s in shards)
    assert all(name in blocks for name in NAMES)


def test_verify_and_diff_json_round_trip_hostile_names(world: World) -> None:
    v = _json("verify", world.out, "--against", world.new, code=1)
    assert set(NAMES) <= {f["tensor"] for f in v["findings"]}  # type: ignore[attr-defined]
    d = _json("diff", world.src, world.new, code=1)
    assert {c["name"] for c in d["changed"]} == set(NAMES)  # type: ignore[attr-defined]
    assert d["metadata"] == {"a": META, "b": {**META, "format": "np"}}


def test_update_and_merge_json_round_trip_hostile_names(world: World, tmp_path: Path) -> None:
    out = _copy_out(world, tmp_path)
    u = _json("split", world.new, out, "--update")
    assert set(u["tensors"]["changed"]) == set(NAMES)  # type: ignore[index]
    target = _merge_target(tmp_path)
    m = _json("merge", out, target)
    assert m["out_file"] == str(target) and target.is_file()
