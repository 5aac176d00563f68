"""llamabridge installed as a user or the image installs it: a normal (non-editable) install of
the files the Dockerfile copies, run from a directory outside the checkout, serves everything,
the dashboard's page included; and the image's lock file pins what pyproject.toml pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import requests

from tests.support.processes import Service

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_sources() -> list[str]:
    """What the image copies to build llamabridge from (its `COPY <src...> /tmp/src/...` lines)."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and words[-1].startswith("/tmp/src"):
            sources += words[1:-1]
    return sources


def test_a_normal_install_serves_the_dashboard_and_its_api_outside_the_checkout(tmp_path, llama):
    source = tmp_path / "src"
    source.mkdir()
    for name in dockerfile_sources():
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    assert {"proxy", "collector", "llamabridge", "dashboard", "pyproject.toml"} <= {p.name for p in source.iterdir()}

    # A fresh environment that borrows only the dependencies of this one (a .pth line is a path,
    # not an install): llamabridge itself comes from the copy, built and installed as a wheel.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(purelib), str(source)], check=True)
    shutil.rmtree(source)  # nothing may be read from the copy once installed

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMABRIDGE_ENV_FILE")}
    where = subprocess.run([python, "-c", ("import proxy, collector, llamabridge, dashboard; "
                            "print(proxy.__file__, dashboard.__file__, sep='\\n')")],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(path).is_relative_to(purelib) for path in where), where

    env.update({"LLAMA_URL": llama.url, "PROXY_HOST": "127.0.0.1", "PROXY_PORT": "0",
                "DB_PATH": str(tmp_path / "store.db")})
    with Service("installed proxy", [str(python), "-m", "proxy"], r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)",
                 env=env, health_path="/", health_method="HEAD", cwd=elsewhere) as proxy:
        page = requests.get(proxy.url + "/dashboard", timeout=10)
        assert page.status_code == 200, page.text[:300]
        assert page.content == (ROOT / "dashboard" / "index.html").read_bytes()
        assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
        totals = requests.get(proxy.url + "/api/totals", timeout=10)
        assert totals.status_code == 200 and "proxy" in totals.json(), totals.text[:300]
    compact = subprocess.run([python, "-m", "collector", "compact"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert compact.returncode == 0 and "Lifetime totals are unchanged" in compact.stdout, compact.stderr


def test_the_lock_file_pins_every_dependency_with_hashes_at_pyprojects_versions():
    lock = (ROOT / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.MULTILINE)
    pins = {name.lower().replace("_", "-"): version for name, version, _ in entries}
    # Every requirement line is a pin with hashes (pip refuses the rest under --require-hashes).
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9]", lock, re.MULTILINE)) > 0
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        name, version = requirement.split("==")
        assert pins.get(name.lower().replace("_", "-")) == version, (
            f"{requirement} in pyproject.toml, {pins.get(name.lower())} in requirements.lock: run `make lock`")
    assert "setuptools" in pins  # the image builds llamabridge without build isolation
