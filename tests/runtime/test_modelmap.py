"""runtime/modelmap.py: where a checkpoint's tensors go in a model built on the meta device.

A small torch module with a tied head (the embedding's weight in two places), written
with the official ``safetensors`` writer and opened as the streaming runner opens it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import torch  # noqa: E402

import safeshard  # noqa: E402
from safeshard.errors import ModelMismatchError, UsageError  # noqa: E402
from safeshard.runtime.modelmap import check_meta, match  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two places


def on_meta() -> Any:
    with torch.device("meta"):
        return Tiny()


def write(path: Path, tensors: dict[str, Any]) -> Path:
    st.save_file(tensors, str(path))
    return path


def weights(**change: Any) -> dict[str, Any]:
    real = Tiny()
    out = {k: v.detach().clone() for k, v in real.state_dict().items() if k != "head.weight"}
    out.update(change)
    return {k: v for k, v in out.items() if v is not None}


def test_check_meta_accepts_a_meta_build_and_refuses_real_weights() -> None:
    check_meta(on_meta())
    with pytest.raises(UsageError, match="meta device") as e:
        check_meta(Tiny())
    assert "'embed.weight'" in str(e.value)  # names the parameter that has weights
    with pytest.raises(UsageError, match="it has none"):
        check_meta(torch.nn.Module())


def test_match_places_every_tensor_and_a_tied_weight_in_both_slots(tmp_path: Path) -> None:
    path = write(tmp_path / "m.safetensors", weights())
    with safeshard.open(path, framework="torch") as lc:
        got = match(on_meta(), lc, None)
    assert set(got) == {
        "embed.weight",
        *(f"layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
    }
    tied = got["embed.weight"]
    assert sorted(s.attr for s in tied.slots) == ["weight", "weight"]
    assert {type(s.module).__name__ for s in tied.slots} == {"Embedding", "Linear"}
    assert tied.info.shape == (10, 4) and not tied.copy
    assert tied.nbytes == 10 * 4 * 4
    assert all(t.placeholder.device.type == "meta" for t in got.values())


def test_a_float_stored_in_another_float_type_is_a_copy(tmp_path: Path) -> None:
    half = weights(**{"layers.0.weight": torch.zeros(4, 4, dtype=torch.float16)})
    path = write(tmp_path / "m.safetensors", half)
    with safeshard.open(path, framework="torch") as lc:
        got = match(on_meta(), lc, None)
    t = got["layers.0.weight"]
    assert t.copy and t.dtype == torch.float32
    assert t.nbytes == 4 * 4 * 2 + 4 * 4 * 4  # the mapped fp16 bytes and the fp32 copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers.1.bias": None}, "no tensor for 1 of the model's weights"),
        ({"extra.weight": torch.zeros(2)}, "have no place in the model"),
        ({"layers.0.weight": torch.zeros(4, 5)}, r"has shape \[4, 5\] in the checkpoint"),
        ({"layers.0.weight": torch.zeros(4, 4, dtype=torch.int32)}, "only floating-point"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_a_checkpoint_for_another_model_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "m.safetensors", weights(**change))
    with (
        safeshard.open(path, framework="torch") as lc,
        pytest.raises(ModelMismatchError, match=message),
    ):
        match(on_meta(), lc, None)
