"""The public surface of the package: exactly what __all__ says."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

import p2ptimeline as pt


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, names only real objects, and every public name is in it."""
    assert list(pt.__all__) == sorted(pt.__all__, key=lambda n: (not n.isupper(), n))
    for name in pt.__all__:
        assert hasattr(pt, name), name
    public = {
        name
        for name, value in vars(pt).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(pt.__all__)


def test_public_objects_are_documented() -> None:
    """Every public class and function has a docstring."""
    for name in pt.__all__:
        value = getattr(pt, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def test_check_password_is_public() -> None:
    """check_password lets an application judge a new password before using it."""
    with pytest.raises(pt.UsageError, match="too short"):
        pt.check_password("abc", "alice")
    with pytest.raises(pt.UsageError, match="username"):
        pt.check_password("alice-alice", "alice")
    pt.check_password("correct horse battery", "alice")
    assert "Raises:" in (inspect.getdoc(pt.check_password) or "")


def test_error_tree() -> None:
    """Every exception derives from P2PTimelineError, as drawn in the errors module."""
    errors = [
        v for v in vars(pt).values() if inspect.isclass(v) and issubclass(v, Exception)
    ]
    assert all(issubclass(e, pt.P2PTimelineError) for e in errors)
    assert issubclass(pt.NotLoggedIn, pt.UsageError)
    assert issubclass(pt.UsageError, ValueError)
    assert issubclass(pt.PeerUnreachable, pt.NetworkError)
    assert issubclass(pt.RegistryUnavailable, pt.NetworkError)
    assert issubclass(pt.InvalidSignature, pt.InvalidRecord)
    assert issubclass(pt.InvalidRecord, pt.RemoteError)
    assert issubclass(pt.DecodeError, pt.RemoteError)
    doc = inspect.getdoc(inspect.getmodule(pt.P2PTimelineError))
    assert doc is not None
    for error in errors:
        assert error.__name__ in doc, error.__name__


def test_logger_names_are_the_documented_ones() -> None:
    """The loggers docs/operations.md lists are exactly those the package logs to."""
    package = Path(pt.__file__).parent
    used = {
        name
        for module in package.rglob("*.py")
        for name in re.findall(r"getLogger\(\"([^\"]+)\"\)", module.read_text())
    }
    operations = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
    listed = set(
        re.findall(r"(?m)^\| `(p2ptimeline[\w.]*)` \|", operations.read_text())
    )
    assert used == listed


def test_version_is_defined_once() -> None:
    """The package version comes from one place and matches the metadata."""
    from importlib.metadata import version

    assert pt.__version__ == version("p2ptimeline")
