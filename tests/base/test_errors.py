"""The public surface: exported names and the error tree."""

from __future__ import annotations

import errno
import inspect
import pickle

import pytest

import safeshard
from safeshard import errors
from safeshard.errors import SafeshardError

ERROR_NAMES = sorted(errors.__all__)


def test_every_exported_name_exists() -> None:
    for name in safeshard.__all__:
        assert hasattr(safeshard, name), name
    assert len(set(safeshard.__all__)) == len(safeshard.__all__)
    assert len(set(errors.__all__)) == len(errors.__all__)


def test_errors_are_re_exported_from_the_package() -> None:
    for name in errors.__all__:
        assert name in safeshard.__all__
        assert getattr(safeshard, name) is getattr(errors, name)


def test_every_error_class_defined_is_exported_and_in_the_tree() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }
    assert defined == set(errors.__all__)
    doc = errors.__doc__ or ""
    for name in defined:
        assert f"── {name}" in doc or f"    {name}\n" in doc, (
            f"{name} missing from the docstring tree"
        )


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_derives_from_safeshard_error_and_a_builtin(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, SafeshardError)
    if cls is SafeshardError:
        return
    builtins = [
        base
        for base in cls.__mro__
        if base.__module__ == "builtins" and base not in (Exception, BaseException, object)
    ]
    assert builtins, f"{name} inherits no builtin exception a caller could catch"


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_has_a_docstring(name: str) -> None:
    assert (getattr(errors, name).__doc__ or "").strip()


def _make(cls: type[SafeshardError]) -> SafeshardError:
    if issubclass(cls, errors.HeaderError):
        return cls("/models/x.safetensors", "tensor 'w': bad")
    return cls("/models: something is wrong")


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_survive_pickling(name: str) -> None:
    """Errors raised in a worker process reach the parent intact."""
    e = _make(getattr(errors, name))
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e)
    assert str(back) == str(e)
    if isinstance(e, errors.HeaderError):
        assert isinstance(back, errors.HeaderError)
        assert (back.path, back.problem) == (e.path, e.problem)


def test_header_error_names_the_file() -> None:
    e = errors.GapError("/m/model.safetensors", "hole of 4 bytes")
    assert e.path == "/m/model.safetensors" and e.problem == "hole of 4 bytes"
    assert str(e) == "/m/model.safetensors: hole of 4 bytes"
    assert isinstance(e, ValueError) and isinstance(e, errors.HeaderError)


def test_disk_full_is_enospc() -> None:
    e = errors.DiskFullError("/out/model-00001-of-00002.safetensors: disk full; removed")
    assert e.errno == errno.ENOSPC
    assert str(e) == "/out/model-00001-of-00002.safetensors: disk full; removed"
    assert isinstance(e, OSError)


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.OutputExistsError, FileExistsError),
        (errors.OutputLockedError, BlockingIOError),
        (errors.SizeParseError, ValueError),
        (errors.UnsafeIndexPathError, ValueError),
        (errors.OversizeTensorError, ValueError),
    ],
)
def test_callers_can_catch_the_natural_builtin(
    cls: type[Exception], builtin: type[Exception]
) -> None:
    with pytest.raises(builtin):
        raise cls("x")
