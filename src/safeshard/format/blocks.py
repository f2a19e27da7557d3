"""Model structure from tensor names alone: blocks, quantized modules and model order.

A *block* is a repeated numbered prefix such as ``model.layers.7`` or
``transformer.h.7``: the first all-digit name component, with what precedes it as
the block's *family* (``model.layers``). A model may have several families
(an encoder and a decoder, a vision tower and a language model). Tensors outside
every block are *head* tensors (embeddings: they come before the first block) or
*tail* tensors (final norm, lm_head: they come after the last block).

Inside a block, the tensors of one module (the name without its last component)
form a *sub-group*; a GPTQ-quantized module is one that has a ``qweight``.

Model order, used for shard packing and for data order inside shards:
head tensors, then each family's blocks by number (compared as numbers), then
tail tensors. Families come in the order data flows through them where the names
say so (vision or audio towers, then encoders, then the rest), else by name.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from safeshard import gcpause

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
"""The tensors of a GPTQ-quantized linear (``bias`` may join them)."""

_TAIL_HINTS = re.compile(
    r"(^|[._])(lm_head|ln_f|norm|final|output|score|classifier|pooler|head)([._]|$)"
)
_DIGITS = re.compile(r"(\d+)")
# The first all-digit component with a component before and after it.
_BLOCK = re.compile(r"\.(\d+)\.")

Key = tuple[tuple[int, int | str], ...]

GroupKind = Literal["head", "block", "tail"]


def natural_key(name: str) -> Key:
    """Sort key that compares digit runs as numbers: ``layers.2`` < ``layers.10``.

    Names that differ only in leading zeros (``a01``, ``a1``) get equal keys; sorts in
    this module add the name itself as a tie-break so that order never depends on
    the order of the input. Digit runs are runs of decimal digits, which ``int`` reads.
    """
    # re.split with a group alternates text and digit runs: odd positions are digits
    return tuple(
        (0, int(part)) if i & 1 else (1, part) for i, part in enumerate(_DIGITS.split(name)) if part
    )


def split_block(name: str) -> tuple[str, int] | None:
    """``("model.layers", 7)`` for ``model.layers.7.mlp.up_proj.weight``; None outside blocks.

    The block index is the first all-digit component that has a family before it and
    something after it.
    """
    m = _BLOCK.search(name)
    if m is None:
        return None
    return name[: m.start()], int(m.group(1))


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last component."""
    return name.rsplit(".", 1)[0] if "." in name else name


def is_tail(name: str) -> bool:
    """Whether an outside-block tensor comes after the blocks (final norm, lm_head, ...)."""
    if "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"]):
        return False
    return bool(_TAIL_HINTS.search(name))


def _family_rank(family: str) -> int:
    """Families that feed others come first: vision towers and encoders before decoders."""
    parts = set(re.split(r"[._]", family))
    if parts & {"vision", "visual", "vit", "image", "audio"}:
        return 0
    if "encoder" in parts:
        return 1
    return 2


def _tail_rank(name: str) -> int:
    # final norms first, then heads
    return 1 if ("head" in name or "output" in name or "score" in name) else 0


@dataclass(frozen=True)
class Module:
    """A sub-group: the tensors of one module, in model order."""

    name: str
    tensors: tuple[str, ...]

    @property
    def quantized(self) -> bool:
        return any(t.endswith(".qweight") for t in self.tensors)


@dataclass(frozen=True)
class Group:
    """A unit of model order: a whole block, or one tensor outside the blocks."""

    key: str
    kind: GroupKind
    modules: tuple[Module, ...]
    family: str | None = None
    number: int | None = None

    @functools.cached_property
    def tensors(self) -> tuple[str, ...]:
        return tuple(itertools.chain.from_iterable(m.tensors for m in self.modules))


MemberKey = tuple[int, Key, str]


def _member_key(last: str) -> MemberKey:
    """Order of a module's members by their last name component: the GPTQ tensors first."""
    if last in GPTQ_SUFFIXES:
        return GPTQ_SUFFIXES.index(last), (), last
    return len(GPTQ_SUFFIXES), natural_key(last), last


class _Keys:
    """Sort keys of name pieces that repeat across blocks (``.mlp.up_proj``, ``weight``),
    each computed once per :func:`group_tensors` call."""

    def __init__(self) -> None:
        self.rest: dict[str, Key] = {}
        self.member: dict[str, MemberKey] = {}

    def of_rest(self, rest: str) -> Key:
        k = self.rest.get(rest)
        if k is None:
            k = self.rest[rest] = natural_key(rest)
        return k

    def of_member(self, name: str) -> MemberKey:
        last = name[name.rfind(".") + 1 :]
        k = self.member.get(last)
        if k is None:
            k = self.member[last] = _member_key(last)
        return k


def _modules(members: Sequence[tuple[str, int]], keys: _Keys) -> tuple[Module, ...]:
    """The modules of one block from ``(tensor name, end of the block prefix)`` pairs.

    Every module name starts with the block's prefix (``model.layers.7``), whose
    natural key is the same for all of them, so modules sort by the key of what
    follows it, a piece that recurs in every block.
    """
    by_module: dict[str, list[str]] = {}
    order: list[tuple[Key, str]] = []
    for n, j in members:
        cut = n.rfind(".")  # a block tensor has a component after the number
        mod = n[:cut]
        same = by_module.get(mod)
        if same is None:
            by_module[mod] = [n]
            order.append((keys.of_rest(n[j:cut]), mod))
        else:
            same.append(n)
    order.sort()
    out: list[Module] = []
    new, setattr_ = object.__new__, object.__setattr__
    for _, m in order:
        ts = by_module[m]
        module = new(Module)  # Module(m, ...) without its __init__ frame: blocks can be big
        setattr_(module, "name", m)
        setattr_(
            module, "tensors", (ts[0],) if len(ts) == 1 else tuple(sorted(ts, key=keys.of_member))
        )
        out.append(module)
    return tuple(out)


@gcpause.pausing
def group_tensors(names: Sequence[str]) -> list[Group]:
    """Group ``names`` into blocks and outside tensors, in model order."""
    blocks: dict[tuple[str, int], list[tuple[str, int]]] = {}
    head: list[str] = []
    tail: list[str] = []
    search = _BLOCK.search
    for n in names:
        m = search(n)
        if m is not None:
            key = (n[: m.start()], int(m.group(1)))
            members = blocks.get(key)
            if members is None:
                blocks[key] = [(n, m.end() - 1)]
            else:
                members.append((n, m.end() - 1))
        elif is_tail(n):
            tail.append(n)
        else:
            head.append(n)
    keys = _Keys()
    groups: list[Group] = []
    for n in sorted(head, key=lambda x: (0 if "embed" in x else 1, natural_key(x), x)):
        groups.append(Group(key=n, kind="head", modules=(Module(module_of(n), (n,)),)))
    for (family, number), members in sorted(
        blocks.items(),
        key=lambda kv: (_family_rank(kv[0][0]), natural_key(kv[0][0]), kv[0][0], kv[0][1]),
    ):
        groups.append(
            Group(
                key=f"{family}.{number}",
                kind="block",
                modules=_modules(members, keys),
                family=family,
                number=number,
            )
        )
    for n in sorted(tail, key=lambda x: (_tail_rank(x), natural_key(x), x)):
        groups.append(Group(key=n, kind="tail", modules=(Module(module_of(n), (n,)),)))
    return groups


def model_order(names: Sequence[str]) -> list[str]:
    """All of ``names`` in model order."""
    return [t for g in group_tensors(names) for t in g.tensors]


def families(groups: Iterable[Group]) -> dict[str, list[int]]:
    """Block numbers of each family, in model order."""
    out: dict[str, list[int]] = {}
    for g in groups:
        if g.kind == "block" and g.family is not None and g.number is not None:
            out.setdefault(g.family, []).append(g.number)
    return out


def describe_blocks(groups: Sequence[Group]) -> str:
    """Short human label for a run of groups, e.g. ``model.embed_tokens, layers 0-17``."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None

    def flush() -> None:
        nonlocal run
        if run is not None:
            fam, a, b = run
            short = fam.rsplit(".", 1)[-1]
            parts.append(f"{short} {a}" if a == b else f"{short} {a}-{b}")
            run = None

    for g in groups:
        if g.kind == "block" and g.family is not None and g.number is not None:
            if run is not None and run[0] == g.family and g.number in (run[2], run[2] + 1):
                run = (run[0], run[1], g.number)
            else:
                flush()
                run = (g.family, g.number, g.number)
        else:
            flush()
            parts.append(g.key.rsplit(".", 1)[0] if g.key.endswith((".weight", ".bias")) else g.key)
    flush()
    # collapse consecutive duplicates (a block split across shards is named in each)
    out: list[str] = []
    for p in parts:
        if not out or out[-1] != p:
            out.append(p)
    return ", ".join(out)
