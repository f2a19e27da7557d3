"""GPTQ detection and consistency, from headers and config files alone.

A GPTQ-quantized linear (v1 format, ``bits`` b, ``group_size`` g, ``in`` × ``out``)
stores four tensors::

    qweight  I32  [in·b/32, out]        packed along in
    qzeros   I32  [in/g,   out·b/32]    packed along out
    scales   F16  [in/g,   out]
    g_idx    I32  [in]

(``in/g`` rounds up, ``·b/32`` rounds down as the packers do; ``group_size`` −1 means
one group.) The settings come from
``quantize_config.json``, else ``config.json``'s ``quantization_config``, else
AutoGPTQ's ``gptq_*`` keys in ``__metadata__``; with none of them they are inferred
from the shapes. Every inconsistency is returned as a :class:`QuantProblem`, never
raised, so that ``inspect`` can show them and ``verify`` can turn them into
findings. :func:`check_module` is the reusable per-module check.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias

from safeshard.format.blocks import GPTQ_SUFFIXES, module_of, natural_key
from safeshard.format.header import TensorInfo

JSONValue: TypeAlias = "str | int | bool | list[int] | None"

ProblemKind = Literal["missing", "shape", "dtype", "config"]

SettingsSource = Literal["quantize_config.json", "config.json", "metadata", "inferred"]

GPTQ_METHODS = ("gptq",)
"""``quant_method`` values whose tensors follow the GPTQ v1 layout checked here."""

VALID_BITS = (2, 3, 4, 8)

EXPECTED_DTYPES: dict[str, str] = {
    "qweight": "I32",
    "qzeros": "I32",
    "scales": "F16",
    "g_idx": "I32",
}

REQUIRED_MEMBERS = GPTQ_SUFFIXES
"""Every GPTQ module must have all four: a missing ``g_idx`` can abort a loader."""


@dataclass(frozen=True)
class QuantProblem:
    """One inconsistency. ``module``/``tensor`` are None for checkpoint-wide problems.

    ``expected`` and ``found`` are JSON values: a shape (list of ints), a dtype, a
    setting's value, or None for something absent.
    """

    kind: ProblemKind
    module: str | None
    tensor: str | None
    expected: JSONValue
    found: JSONValue
    detail: str = ""

    @property
    def message(self) -> str:
        where = self.tensor or self.module or "checkpoint"
        if self.kind == "missing":
            text = f"{where}: missing; a GPTQ module needs {', '.join(REQUIRED_MEMBERS)}"
        elif self.kind == "shape":
            text = f"{where}: shape {self.found} but expected {self.expected}"
        elif self.kind == "dtype":
            text = f"{where}: dtype {self.found} but expected {self.expected}"
        elif self.detail:
            return f"{where}: {self.detail}" if self.module or self.tensor else self.detail
        else:
            text = f"{where}: expected {self.expected!r}, found {self.found!r}"
        return f"{text} ({self.detail})" if self.detail else text

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "module": self.module,
            "tensor": self.tensor,
            "expected": self.expected,
            "found": self.found,
            "message": self.message,
        }


@dataclass(frozen=True)
class QuantSettings:
    """Quantization settings and where they were read."""

    method: str
    bits: int | None
    group_size: int | None
    desc_act: bool | None
    sym: bool | None
    source: SettingsSource

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
        }


@dataclass(frozen=True)
class QuantReport:
    """What :func:`analyze` found: the settings in force, the quantized modules and problems.

    ``inferred`` holds what the shapes alone say (None when there are no GPTQ tensors
    or they say nothing consistent), whatever ``settings.source`` is.
    """

    settings: QuantSettings
    modules: tuple[str, ...]
    problems: tuple[QuantProblem, ...]
    inferred: QuantSettings | None = None
    sources: tuple[QuantSettings, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return self.settings.to_json()


# --------------------------------------------------------------------------- shapes


def _groups(in_features: int, group_size: int) -> int:
    """Rows of scales/qzeros: ``ceil(in / group_size)``, or 1 for ``group_size`` <= 0."""
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def _want(
    in_f: int, out_f: int, bits: int, group_size: int | None, bias: bool
) -> dict[str, tuple[int, ...]]:
    """Expected shapes; without ``group_size`` the group-counted members are left out."""
    want: dict[str, tuple[int, ...]] = {
        "qweight": (in_f * bits // 32, out_f),
        "g_idx": (in_f,),
    }
    if group_size is not None:
        groups = _groups(in_f, group_size)
        want["qzeros"] = (groups, out_f * bits // 32)
        want["scales"] = (groups, out_f)
    if bias:
        want["bias"] = (out_f,)
    return want


def _dims(
    members: Mapping[str, TensorInfo], bits: int, group_size: int | None
) -> tuple[int, int] | None:
    """(in, out) of the linear that leaves the fewest members wrong.

    Candidates for ``in`` come from qweight's rows and g_idx's length, for ``out``
    from qweight's and scales' columns and qzeros' packed columns. Among equally
    good pairs, the one more members state wins, then one whose ``in`` is a
    multiple of 32, then qweight's reading; so a wrong g_idx length is blamed on
    g_idx and a wrong ``bits`` on qweight.
    """

    def dim(name: str, axis: int, rank: int) -> int | None:
        t = members.get(name)
        if t is None or len(t.shape) != rank:
            return None
        return t.shape[axis]

    def unpacked(packed: int | None) -> int | None:
        if packed is None or (packed * 32) % bits:
            return None
        return packed * 32 // bits

    in_cands = [unpacked(dim("qweight", 0, 2)), dim("g_idx", 0, 1)]
    out_cands = [dim("qweight", 1, 2), dim("scales", 1, 2), unpacked(dim("qzeros", 1, 2))]
    best: tuple[tuple[int, ...], tuple[int, int]] | None = None
    for i, in_f in enumerate(in_cands):
        for j, out_f in enumerate(out_cands):
            if in_f is None or out_f is None:
                continue
            want = _want(in_f, out_f, bits, group_size, "bias" in members)
            wrong = sum(
                1 for m, shape in want.items() if m in members and members[m].shape != shape
            )
            # an in/out that does not pack into whole int32 words fits no qweight/qzeros
            wrong += (in_f * bits) % 32 != 0 and "qweight" in members
            wrong += (out_f * bits) % 32 != 0 and "qzeros" in members
            support = in_cands.count(in_f) + out_cands.count(out_f)
            score = (wrong, -support, 0 if in_f % 32 == 0 else 1, i, j)
            if best is None or score < best[0]:
                best = (score, (in_f, out_f))
    return best[1] if best is not None else None


def member_of(name: str) -> str:
    """``qweight`` for ``model.layers.0.mlp.up_proj.qweight``."""
    return name.rsplit(".", 1)[-1]


def check_module(
    module: str,
    tensors: Mapping[str, TensorInfo],
    bits: int | None,
    group_size: int | None,
) -> list[QuantProblem]:
    """Problems of one GPTQ module: missing members, wrong dtypes, wrong shapes.

    ``tensors`` maps tensor names (full, or just the member such as ``qweight``) to
    their header entries; members other than the four GPTQ tensors and ``bias`` are
    ignored. With ``bits`` None only presence and dtypes are checked; with
    ``group_size`` None the group counts are not checked.
    """
    members: dict[str, TensorInfo] = {}
    names: dict[str, str] = {}
    for key, info in tensors.items():
        m = member_of(key)
        members[m] = info
        names[m] = key if "." in key else f"{module}.{m}"
    problems: list[QuantProblem] = []
    for m in REQUIRED_MEMBERS:
        if m not in members:
            problems.append(
                QuantProblem(
                    "missing",
                    module,
                    f"{module}.{m}",
                    expected=m,
                    found=None,
                    detail="the module has " + ", ".join(sorted(members)),
                )
            )
    for m in REQUIRED_MEMBERS:
        present = members.get(m)
        if present is not None and present.dtype != EXPECTED_DTYPES[m]:
            problems.append(
                QuantProblem(
                    "dtype",
                    module,
                    names[m],
                    expected=EXPECTED_DTYPES[m],
                    found=present.dtype,
                    detail=f"GPTQ stores {m} as {EXPECTED_DTYPES[m]}",
                )
            )
    if bits is None or bits <= 0:
        return problems
    dims = _dims(members, bits, group_size)
    if dims is None:
        return problems
    in_f, out_f = dims
    want = _want(in_f, out_f, bits, group_size, "bias" in members)
    g_text = "one group" if group_size is not None and group_size <= 0 else f"group {group_size}"
    for m in (*REQUIRED_MEMBERS, "bias"):
        got = members.get(m)
        if got is None or m not in want or got.shape == want[m]:
            continue
        problems.append(
            QuantProblem(
                "shape",
                module,
                names[m],
                expected=list(want[m]),
                found=list(got.shape),
                detail=f"in={in_f}, out={out_f}, bits={bits}, {g_text}",
            )
        )
    return problems


# --------------------------------------------------------------------------- modules


def quantized_modules(tensors: Iterable[TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """GPTQ modules: those with a qweight, qzeros or g_idx (scales alone is too common).

    Each maps member names (``qweight``, ``bias``, ...) to header entries; modules are
    in natural order (``layers.2`` before ``layers.10``).
    """
    tensors = list(tensors)
    markers = tuple("." + m for m in ("qweight", "qzeros", "g_idx"))
    gptq = {
        module_of(t.name)
        for t in tensors
        if t.name.endswith(markers) or t.name in ("qweight", "qzeros", "g_idx")
    }
    if not gptq:  # unquantized: one cheap pass
        return {}
    by_module: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        mod = module_of(t.name)
        if mod in gptq:
            by_module.setdefault(mod, {})[member_of(t.name)] = t
    return {mod: by_module[mod] for mod in sorted(by_module, key=lambda m: (natural_key(m), m))}


def infer_module(members: Mapping[str, TensorInfo]) -> tuple[int | None, int | None]:
    """(bits, group_size) that one module's shapes imply, each None when they don't say.

    bits: 32·qzeros cols / qweight cols, else 32·qweight rows / g_idx length.
    group_size: in / scales rows (−1 for a single group over more than one row).
    """
    qw, qz, sc, gi = (members.get(m) for m in REQUIRED_MEMBERS)
    bits: int | None = None
    pairs: list[tuple[int, int]] = []
    if qw is not None and qz is not None and len(qw.shape) == 2 and len(qz.shape) == 2:
        pairs.append((qz.shape[1], qw.shape[1]))
    if qw is not None and gi is not None and len(qw.shape) == 2 and len(gi.shape) == 1:
        pairs.append((qw.shape[0], gi.shape[0]))
    for packed, full in pairs:
        if full and (packed * 32) % full == 0 and packed * 32 // full in VALID_BITS:
            bits = packed * 32 // full
            break
    in_f: int | None = None
    if gi is not None and len(gi.shape) == 1:
        in_f = gi.shape[0]
    elif bits is not None and qw is not None and len(qw.shape) == 2:
        in_f = qw.shape[0] * 32 // bits
    rows = None
    for t in (sc, qz):
        if t is not None and len(t.shape) == 2:
            rows = t.shape[0]
            break
    group: int | None = None
    if in_f and rows:
        if rows == 1 and in_f > 1:
            group = -1
        elif in_f % rows == 0:
            group = in_f // rows
        else:
            group = math.ceil(in_f / rows)
            if _groups(in_f, group) != rows:
                group = None
    return bits, group


def infer_settings(modules: Mapping[str, Mapping[str, TensorInfo]]) -> QuantSettings | None:
    """GPTQ settings that most modules' shapes agree on; None without any evidence."""
    bits_votes: Counter[int] = Counter()
    group_votes: Counter[int] = Counter()
    for members in modules.values():
        b, g = infer_module(members)
        if b is not None:
            bits_votes[b] += 1
        if g is not None:
            group_votes[g] += 1
    if not bits_votes and not group_votes:
        return None
    bits = bits_votes.most_common(1)[0][0] if bits_votes else None
    # A model whose linears all have fewer inputs than the group size shows one
    # group everywhere; it says -1 only if no module says otherwise.
    group = None
    if group_votes:
        positive = Counter({g: n for g, n in group_votes.items() if g > 0})
        group = (positive or group_votes).most_common(1)[0][0]
    return QuantSettings("gptq", bits, group, None, None, "inferred")


# --------------------------------------------------------------------------- configs


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _settings_from(
    obj: Mapping[str, Any], source: SettingsSource, prefix: str = ""
) -> tuple[QuantSettings, list[QuantProblem]]:
    problems: list[QuantProblem] = []
    method_raw = obj.get(f"{prefix}quant_method", "gptq")
    method = str(method_raw).lower() if method_raw is not None else "gptq"
    values: dict[str, Any] = {}
    for key, conv, kind in (
        ("bits", _as_int, "an integer"),
        ("group_size", _as_int, "an integer"),
        ("desc_act", _as_bool, "true or false"),
        ("sym", _as_bool, "true or false"),
    ):
        raw = obj.get(prefix + key)
        value = conv(raw) if raw is not None else None
        if raw is not None and value is None:
            problems.append(
                QuantProblem(
                    "config",
                    None,
                    None,
                    expected=kind,
                    found=str(raw),
                    detail=f"{source}: {prefix + key} must be {kind}",
                )
            )
        values[key] = value
    bits = values["bits"]
    if method in GPTQ_METHODS and bits is not None and bits not in VALID_BITS:
        problems.append(
            QuantProblem(
                "config",
                None,
                None,
                expected=f"one of {', '.join(map(str, VALID_BITS))}",
                found=bits,
                detail=f"{source}: GPTQ bits must be one of {VALID_BITS}",
            )
        )
    return (
        QuantSettings(
            method, bits, values["group_size"], values["desc_act"], values["sym"], source
        ),
        problems,
    )


class QuantConfigs(NamedTuple):
    """The JSON objects of a checkpoint's ``quantize_config.json`` and ``config.json``
    (None where absent or unreadable); :func:`safeshard.checkpoint.quant_configs` reads them."""

    quantize_config: Mapping[str, Any] | None
    config: Mapping[str, Any] | None


def config_settings(
    configs: QuantConfigs | None, metadata: Mapping[str, str] | None = None
) -> tuple[list[QuantSettings], list[QuantProblem]]:
    """Settings from every source present, in precedence order, and their own problems.

    Sources: ``quantize_config.json``, ``config.json``'s ``quantization_config``, and
    AutoGPTQ's ``gptq_bits``/``gptq_group_size``/... keys in ``__metadata__``.
    """
    found: list[QuantSettings] = []
    problems: list[QuantProblem] = []
    if configs is not None:
        qc = configs.quantize_config
        if qc is not None and ("bits" in qc or "quant_method" in qc):
            s, p = _settings_from(qc, "quantize_config.json")
            found.append(s)
            problems.extend(p)
        cfg = configs.config
        qcfg = cfg.get("quantization_config") if cfg is not None else None
        if isinstance(qcfg, dict):
            s, p = _settings_from(qcfg, "config.json")
            found.append(s)
            problems.extend(p)
    if metadata is not None and "gptq_bits" in metadata:
        s, p = _settings_from(metadata, "metadata", prefix="gptq_")
        found.append(s)
        problems.extend(p)
    return found, problems


def _label(source: SettingsSource) -> str:
    return "the weights' __metadata__" if source == "metadata" else source


def _disagreements(sources: Sequence[QuantSettings]) -> list[QuantProblem]:
    if len(sources) < 2:
        return []
    first = sources[0]
    problems: list[QuantProblem] = []
    for other in sources[1:]:
        for key in ("method", "bits", "group_size", "desc_act", "sym"):
            a, b = getattr(first, key), getattr(other, key)
            if a is not None and b is not None and a != b:
                problems.append(
                    QuantProblem(
                        "config",
                        None,
                        None,
                        expected=a,
                        found=b,
                        detail=f"{_label(other.source)} says {key}={b!r} but "
                        f"{_label(first.source)} says {a!r}; loaders read different files, "
                        "so make them agree",
                    )
                )
    return problems


# --------------------------------------------------------------------------- analysis


def analyze(
    tensors: Iterable[TensorInfo],
    configs: QuantConfigs | None = None,
    metadata: Mapping[str, str] | None = None,
) -> QuantReport | None:
    """Detect quantization and cross-check it against the tensors; None if unquantized.

    The settings in force are the first source present (quantize_config.json,
    config.json, metadata), completed field by field from later ones and from the
    shapes. Every GPTQ module is checked with :func:`check_module`.
    """
    modules = quantized_modules(tensors)
    sources, problems = config_settings(configs, metadata)
    inferred = infer_settings(modules) if modules else None
    if not sources and inferred is None and not modules:
        return None
    if sources:
        s = sources[0]
        fill = [*sources[1:], *([inferred] if inferred is not None else [])]
        settings = QuantSettings(
            s.method,
            s.bits if s.bits is not None else _first(fill, "bits"),
            s.group_size if s.group_size is not None else _first(fill, "group_size"),
            s.desc_act if s.desc_act is not None else _first(fill, "desc_act"),
            s.sym if s.sym is not None else _first(fill, "sym"),
            s.source,
        )
    elif inferred is not None:
        settings = inferred
    else:
        settings = QuantSettings("gptq", None, None, None, None, "inferred")
    problems.extend(_disagreements(sources))
    if settings.method in GPTQ_METHODS:
        if not modules:
            problems.append(
                QuantProblem(
                    "config",
                    None,
                    None,
                    expected="GPTQ modules (qweight/qzeros/scales/g_idx)",
                    found=None,
                    detail=f"{settings.source} says quant_method=gptq but no tensor is "
                    "quantized; remove the quantization config or use the quantized weights",
                )
            )
        if inferred is not None and settings.source != "inferred":
            for key in ("bits", "group_size"):
                said, shapes = getattr(settings, key), getattr(inferred, key)
                if said is not None and shapes is not None and said != shapes:
                    problems.append(
                        QuantProblem(
                            "config",
                            None,
                            None,
                            expected=said,
                            found=shapes,
                            detail=f"{settings.source} says {key}={said} but the tensor shapes "
                            f"say {key}={shapes}; fix {settings.source} or re-quantize",
                        )
                    )
        for mod, members in modules.items():
            problems.extend(
                check_module(
                    mod,
                    {t.name: t for t in members.values()},
                    settings.bits,
                    settings.group_size,
                )
            )
    return QuantReport(
        settings=settings,
        modules=tuple(modules),
        problems=tuple(problems),
        inferred=inferred,
        sources=tuple(sources),
    )


def _first(sources: Sequence[QuantSettings], key: str) -> Any:
    for s in sources:
        value = getattr(s, key)
        if value is not None:
            return value
    return None
