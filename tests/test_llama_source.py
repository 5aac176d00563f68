"""llama/source.py unpacks llama.cpp's source archive safely on every Python it runs on: with
tarfile's "data" filter where there is one, and with the same refusals checked by hand on
Pythons before 3.11.4 (Debian 12's python3), which lack extraction filters."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

# llama/ holds scripts run before any virtual environment exists, not a package: load the file.
_spec = importlib.util.spec_from_file_location("llama_source", Path(__file__).resolve().parents[1] / "llama" / "source.py")
assert _spec is not None and _spec.loader is not None
source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(source)


def archive(*members: tuple[str, bytes | None, str | None]) -> tarfile.TarFile:
    """A tar.gz in memory of (name, file content, symlink target) members."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size, info.mode = len(content or b""), 0o4755
                tar.addfile(info, io.BytesIO(content or b""))
    data.seek(0)
    return tarfile.open(fileobj=data, mode="r:gz")


@pytest.fixture(params=["filter", "by hand"])
def python(request, monkeypatch):
    if request.param == "by hand":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def test_a_plain_archive_is_unpacked_without_setuid_bits(python, tmp_path):
    source.extract(archive(("pkg/llama.cpp/CMakeLists.txt", b"project(llama)", None),
                           ("pkg/llama.cpp/latest", None, "CMakeLists.txt")), str(tmp_path))
    unpacked = tmp_path / "pkg" / "llama.cpp" / "CMakeLists.txt"
    assert unpacked.read_bytes() == b"project(llama)" and not unpacked.stat().st_mode & 0o4000
    assert (tmp_path / "pkg" / "llama.cpp" / "latest").resolve() == unpacked.resolve()


@pytest.mark.parametrize("member", [("../escaped", b"x", None), ("pkg/link", None, "/etc/passwd"),
                                    ("pkg/link", None, "../../outside")])
def test_a_member_that_would_land_outside_is_refused(python, tmp_path, member):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises((SystemExit, tarfile.TarError)):
        source.extract(archive(member), str(dest))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "outside").exists()


def test_an_absolute_path_lands_inside_or_nowhere(python, tmp_path):
    """The "data" filter strips the leading slash; the hand-made check refuses the member."""
    name = f"{tmp_path}/outside/abs"
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        source.extract(archive((name, b"x", None)), str(dest))
    except SystemExit:
        assert python == "by hand"
    else:
        assert python == "filter" and (dest / name.lstrip("/")).read_bytes() == b"x"
    assert not (tmp_path / "outside").exists()
