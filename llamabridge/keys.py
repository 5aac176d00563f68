"""API keys, one per person: the keys file, checking a key, and `python -m proxy keys`.

The file (API_KEYS_FILE, by default `keys.json` beside the store) holds, per key, its name,
a random salt, the SHA-256 of salt and key, and optional limits. The key itself is printed once
by `keys add` and stored nowhere. A plain salted hash is enough here because every key is 256
random bits (no dictionary to try); a slow hash would cost every request its time.

Services re-read the file when it changes (a `stat` per check), so `keys add` and `keys remove`
take effect at once, without a restart. A file that cannot be read while a service runs locks
everyone out (logged) rather than letting everyone in.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("llamabridge.keys")

KEY_PREFIX = "llb-"
# A name is a log field and a Prometheus label value: short, and nothing that needs quoting.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeysFileError(Exception):
    """The keys file exists but is not a keys file (the message says what is wrong)."""


@dataclass(frozen=True)
class Limits:
    """Optional per-key limits; None is no limit."""

    concurrent: int | None = None  # generations queued or running at once
    tokens_per_minute: int | None = None  # prompt tokens prefilled plus tokens generated, over the last 60 s


@dataclass(frozen=True)
class Key:
    name: str
    salt: str
    digest: str
    created: float
    limits: Limits = field(default_factory=Limits)

    def matches(self, candidate: bytes) -> bool:
        return hmac.compare_digest(_digest(self.salt, candidate), self.digest)


def _digest(salt: str, key: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key).hexdigest()


def _limit(entry: dict, name: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KeysFileError(f"key {entry.get('name')!r}: {name} must be a whole number of at least 1, or null")
    return value


def read(path: str | Path) -> list[Key]:
    """The keys in the file; none if it does not exist. Raises KeysFileError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        entries = data["keys"]
        if not isinstance(entries, list):
            raise TypeError
        keys = []
        for entry in entries:
            if not isinstance(entry, dict) or not NAME.match(str(entry.get("name", ""))):
                raise KeysFileError(f"{path}: every key needs a name of letters, digits and . _ @ - (found {entry!r:.80})")
            bytes.fromhex(entry["salt"])
            int(entry["sha256"], 16)
            keys.append(Key(entry["name"], entry["salt"], entry["sha256"], float(entry.get("created", 0)),
                            Limits(_limit(entry, "concurrent"), _limit(entry, "tokens_per_minute"))))
    except KeysFileError:
        raise
    except (ValueError, KeyError, TypeError):
        raise KeysFileError(f"{path} is not a llamabridge keys file (expected {{\"keys\": [...]}} as `keys add` writes it)") from None
    return keys


def _write(path: Path, keys: list[Key]) -> None:
    """Replace the file whole (a reader sees the old file or the new one), readable by its owner only."""
    entries = [{"name": k.name, "salt": k.salt, "sha256": k.digest, "created": k.created,
                "concurrent": k.limits.concurrent, "tokens_per_minute": k.limits.tokens_per_minute} for k in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"keys": entries}, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One `keys add` or `keys remove` at a time on this file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def add(path: str | Path, name: str, limits: Limits = Limits()) -> str:
    """Add a key named `name`; returns the key (the only time it exists outside its holder)."""
    if not NAME.match(name):
        raise ValueError(f"{name!r}: a key's name is 1 to 64 letters, digits and . _ @ - (starting with a letter or digit)")
    path = Path(path)
    with _locked(path):
        keys = read(path)
        if any(k.name == name for k in keys):
            raise ValueError(f"a key named {name!r} exists already (remove it first to replace it)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        _write(path, [*keys, Key(name, salt, _digest(salt, key.encode()), time.time(), limits)])
    return key


def remove(path: str | Path, name: str) -> bool:
    path = Path(path)
    with _locked(path):
        keys = read(path)
        kept = [k for k in keys if k.name != name]
        if len(kept) == len(keys):
            return False
        _write(path, kept)
    return True


class KeyFile:
    """The keys a running service checks requests against, re-read whenever the file changes."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = ()  # (inode, size, mtime) of the file read; None: no file
        self._keys: list[Key] = []
        self._broken = False
        # Keys that matched, by their SHA-256: a returning key costs one hash, not one per key.
        self._known: dict[bytes, Key] = {}

    def _current(self) -> tuple[list[Key], bool]:
        try:
            st = os.stat(self.path)
            stamp: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError:
            stamp = ("unreadable",)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        keys, broken = read(self.path), False
                    except KeysFileError as exc:
                        log.error("%s; refusing every request that needs a key until it is fixed", exc)
                        keys, broken = [], True
                    self._keys, self._broken, self._known, self._stamp = keys, broken, {}, stamp
        return self._keys, self._broken

    def configured(self) -> bool:
        """Whether requests need a key: the file names at least one (or cannot be read)."""
        keys, broken = self._current()
        return broken or bool(keys)

    def verify(self, candidate: str) -> Key | None:
        """The key `candidate` is, or None. Every stored key is compared, in constant time each."""
        keys, _ = self._current()
        raw = candidate.encode("utf-8", "surrogateescape")
        fingerprint = hashlib.sha256(raw).digest()
        known = self._known.get(fingerprint)
        if known is not None:
            return known
        found = None
        for key in keys:
            if key.matches(raw):
                found = key
        if found is not None:
            self._known[fingerprint] = found
        return found


# -------------------------------------------------------------------------------------------
# `python -m proxy keys add|list|remove`


def main(argv: list[str], path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy keys",
                                     description=f"Manage the proxy's API keys (API_KEYS_FILE, here {path}).")
    commands = parser.add_subparsers(dest="command", required=True)
    adding = commands.add_parser("add", help="make a key for NAME and print it once, on the last line")
    adding.add_argument("name")
    adding.add_argument("--concurrent", type=int, metavar="N", help="at most N generations of this key queued or running at once")
    adding.add_argument("--tokens-per-minute", type=int, metavar="N",
                        help="at most N tokens (prefilled plus generated) over any minute")
    commands.add_parser("list", help="the keys' names, when they were made and their limits")
    removing = commands.add_parser("remove", help="revoke NAME's key (at once, no restart)")
    removing.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            for option in ("concurrent", "tokens_per_minute"):
                if getattr(args, option) is not None and getattr(args, option) < 1:
                    parser.error(f"--{option.replace('_', '-')} must be at least 1")
            secret = add(path, args.name, Limits(args.concurrent, args.tokens_per_minute))
            print(f"Added the key {args.name!r} to {path}; services using that file take it at once.")
            print("Only its hash is stored: copy it now, it is not shown again.")
            print(secret)
        elif args.command == "remove":
            if not remove(path, args.name):
                print(f"no key named {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"Removed the key {args.name!r}: it stops working at once.")
        else:
            keys = read(path)
            if not keys:
                print(f"No keys in {path}: the proxy asks for none while it listens on loopback only.")
            for key in keys:
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created))
                limits = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in vars(key.limits).items() if value)
                print(f"{key.name}\tmade {made}\t{limits or 'no limits'}")
    except (ValueError, KeysFileError, OSError) as exc:
        print(f"llamabridge keys: {exc}", file=sys.stderr)
        return 2
    return 0
