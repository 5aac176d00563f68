"""Slot KV caches on disk: a conversation's prompt cache outlives llama-server.

llama-server keeps what a slot has evaluated only while it runs. Every restart (a flag or model
change, an upgrade, a crash, `make up` after editing `.env`) would make the next turn of every
Claude Code session, and the first of every new one, prefill its ~20k-token system prompt and
tools again: minutes on a large model. llama-server can write a slot's cache to a file and read
it back (`--slot-save-path DIR`, `POST /slots/N?action=save|restore`); this module decides when.

Saving. When a session's slot has stayed idle for KV_SAVE_IDLE seconds after a main-loop turn,
the saver thread takes the slot from the gate (`Gate.hold`: only if nobody waits and nobody used
it since) and has llama-server save it. A request that arrives meanwhile waits at most for that
save. A file is named by what it holds: the model's identity, the slot's context and a hash of
the prompt's tokens; it is indexed in the store with the session, its size and its last use.
A newer file of the same conversation makes an older one redundant (its tokens begin the newer
one's), and KV_CACHE_MAX_GB evicts the least recently used.

Restoring. A file is indexed by hashes of its prompt's first 256, 512, ... tokens and of all of
them, so a request's prompt (its exact tokens, counted for every tracked turn) finds the file
that shares the longest beginning with it: the session's own latest file, or, for a new session,
another session's file with the same system prompt and tools. It is restored into the slot the
gate gave the turn, before the turn is sent, when that can only help:
- the slot holds nothing (llama-server has run nothing in it since it started), or
- llama-server cannot hold this session's cache any more (it restarted since the session's last
  turn, or this proxy has never seen the session) and the file gives more than what the slot
  holds shares with the prompt. What the slot held is saved first if it was not yet.
A slot the gate remembers using that llama-server shows empty means llama-server restarted: the
gate forgets what its slots held. Only files of the model llama-server runs now (read afresh
before a restore) that fit the slot's context are restored; llama.cpp itself refuses a file of
another cache type. A restore that fails or is refused never fails the turn: it prefills, and
the failure is logged and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Protocol

from llamabridge.store import Store

from . import classify
from .config import Settings
from .errors import ApiError
from .gate import Gate, Ticket
from .metrics import Call, ProxyMetrics
from .prefix import PrefixTracker, common_prefix
from .upstream import ServerInfo, Upstream

log = logging.getLogger("llamabridge.kvcache")

# Tokens between the prefix hashes a file is indexed by: a new session finds another session's
# file by the longest run of equal hashes, and llama-server then reuses all the tokens the two
# really share, not only the checkpoints.
CHECKPOINT = 256
# A shorter match is not worth a disk read: llama-server prefills that many tokens about as fast.
MIN_RESTORE_TOKENS = 2 * CHECKPOINT
# Files that llama-server writes for us: <model identity>-c<slot context>-<hash of the prompt>.bin
NAME = re.compile(r"^[0-9a-f]{12}-c\d+-[0-9a-f]{32}\.bin$")
SAVE_TIMEOUT = 600.0  # a large model's cache is gigabytes
SESSIONS_KEPT = 4096


class Target(Protocol):
    """A llama-server and the gate in front of it (services.Target, with one upstream: with
    several, nothing is saved to disk)."""

    @property
    def upstream(self) -> Upstream: ...

    @property
    def gate(self) -> Gate: ...


def _digest(h: Any) -> str:
    return h.hexdigest()


def _ran_a_session(user: str | None) -> bool:
    """A session's turn ran in the slot (an unnamed request may have left before it started)."""
    return user is not None and not user.startswith("<")


class Prompt:
    """A prompt's tokens with the hashes of their beginnings, each computed once."""

    def __init__(self, tokens: array):
        self.tokens = tokens
        self._view = memoryview(tokens).cast("B")
        self._item = tokens.itemsize
        self._states: list[Any] = []  # blake2b after each CHECKPOINT tokens
        h = hashlib.blake2b(digest_size=16)
        for end in range(CHECKPOINT, len(tokens) + 1, CHECKPOINT):
            h.update(self._view[(end - CHECKPOINT) * self._item:end * self._item])
            self._states.append(h.copy())
        self.checkpoints = [_digest(state) for state in self._states]

    def hash_of_first(self, n: int) -> str:
        """The hash of the first `n` tokens (as a file's `full` hash is computed)."""
        k = min(n // CHECKPOINT, len(self._states))
        h = self._states[k - 1].copy() if k else hashlib.blake2b(digest_size=16)
        h.update(self._view[k * CHECKPOINT * self._item:n * self._item])
        return _digest(h)

    @property
    def full(self) -> str:
        return self.hash_of_first(len(self.tokens))

    def shared_with(self, saved: SavedFile) -> int:
        """How many of `saved`'s prompt tokens begin this prompt: all of them, or as many
        checkpoints as agree."""
        if saved.tokens <= len(self.tokens) and self.hash_of_first(saved.tokens) == saved.full:
            return saved.tokens
        agree = 0
        for mine, theirs in zip(self.checkpoints, saved.checkpoints, strict=False):
            if mine != theirs:
                break
            agree += 1
        return agree * CHECKPOINT


@dataclass(frozen=True)
class SavedFile:
    name: str
    model: str  # ServerInfo.identity of the llama-server that saved it
    n_ctx: int  # the slot's context then
    tokens: int  # prompt tokens its hashes cover
    checkpoints: tuple[str, ...]
    full: str
    saved_tokens: int  # tokens in the file: the prompt and the answer
    bytes: int
    session: str | None
    created: float
    last_used: float

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "n_ctx": self.n_ctx, "tokens": self.tokens,
                "checkpoints": json.dumps({"step": CHECKPOINT, "hashes": list(self.checkpoints), "full": self.full}),
                "saved_tokens": self.saved_tokens, "bytes": self.bytes, "session": self.session,
                "created": self.created, "last_used": self.last_used}

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> SavedFile | None:
        try:
            hashes = json.loads(row["checkpoints"])
            if hashes.get("step") != CHECKPOINT:
                return None  # indexed at another step: cannot be matched
            return cls(row["name"], row["model"], int(row["n_ctx"]), int(row["tokens"]), tuple(hashes["hashes"]),
                       str(hashes["full"]), int(row["saved_tokens"]), int(row["bytes"]), row["session"],
                       float(row["created"]), float(row["last_used"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class Pending:
    """A main-loop turn whose slot is to be saved once idle."""

    target: Target
    slot: int
    session: str
    prompt: Prompt
    due: float


class KvCache:
    def __init__(self, settings: Settings, metrics: ProxyMetrics, tracker: PrefixTracker, store: Store | None):
        self.dir = settings.kv_cache_dir
        self.idle = settings.kv_save_idle
        self.budget = settings.kv_cache_max_bytes
        self.metrics = metrics
        self.tracker = tracker
        self.store = store
        self.problem: str | None = None  # why saving does not work, while it does not
        self._cond = threading.Condition()
        self._files: dict[str, SavedFile] = {}
        self._pending: dict[tuple[int, int], Pending] = {}  # (id(target), slot) -> its unsaved turn
        self._last_turn: OrderedDict[str, float] = OrderedDict()  # session -> when its last turn ended
        self._restarted_at = time.monotonic()  # this process knows nothing of what llama-server holds
        self._thread: threading.Thread | None = None
        self.enabled = bool(self.dir)
        if self.enabled and not os.path.isdir(self.dir):
            log.warning("KV_CACHE_DIR=%s is not a directory: prompt caches are not saved to disk", self.dir)
            self.enabled = False
        if self.enabled:
            self._load()

    # -- what is on disk ---------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _load(self) -> None:
        """The index from the store, less files gone from disk; files on disk the store does not
        know (written while the store was unreachable) cannot be matched and are deleted."""
        rows = []
        if self.store is not None:
            try:
                rows = self.store.kv_files()
            except sqlite3.Error as exc:  # an unreadable store must not stop the proxy: start empty
                log.warning("could not read the KV-cache index from the store (%s): starting without it", exc)
        gone = []
        for row in rows:
            saved = SavedFile.of_row(row)
            if saved is not None and os.path.isfile(self._path(saved.name)):
                self._files[saved.name] = saved
            else:
                gone.append(row["name"])
        self._forget_rows(gone)
        for name in os.listdir(self.dir):
            if NAME.match(name) and name not in self._files:
                self._unlink(name)
        self._gauges()
        log.info("prompt caches are saved to %s (%d files, %.1f MB; KV_SAVE_IDLE=%gs, KV_CACHE_MAX_GB=%g)", self.dir,
                 len(self._files), self._bytes() / 1e6, self.idle, self.budget / 1e9)

    def _bytes(self) -> int:
        return sum(f.bytes for f in self._files.values())

    def _gauges(self) -> None:
        self.metrics.kv_files.set(len(self._files))
        self.metrics.kv_bytes.set(self._bytes())

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s from KV_CACHE_DIR: %s", name, exc)

    def _forget_rows(self, names: list[str]) -> None:
        if self.store is not None and names:
            try:
                self.store.kv_delete(names)
            except sqlite3.Error as exc:
                log.warning("could not update the KV-cache index in the store: %s", exc)

    def _remove(self, names: list[str], reason: str) -> None:
        with self._cond:
            for name in names:
                self._files.pop(name, None)
            self._gauges()
        for name in names:
            self._unlink(name)
            self.metrics.kv_evictions.labels(reason).inc()
        self._forget_rows(names)

    def status(self) -> str:
        if not self.dir:
            return "not persisted (KV_CACHE_DIR is not set)"
        if not self.enabled:
            return f"not persisted (KV_CACHE_DIR={self.dir} is not a directory)"
        with self._cond:
            files, size = len(self._files), self._bytes()
        said = f"persisted in {self.dir}: {files} files, {size / 1e6:.1f} MB"
        return said + (f"; the last save failed: {self.problem}" if self.problem else "")

    def files(self) -> list[SavedFile]:
        with self._cond:
            return sorted(self._files.values(), key=lambda f: f.last_used)

    # -- after a turn ------------------------------------------------------------------------------

    def turn_ended(self, target: Target, ticket: Ticket, call: Call, tokens: array | None) -> None:
        """A tracked turn completed on `ticket.slot`: remember it, and save a main-loop turn's slot
        once it has been idle for KV_SAVE_IDLE."""
        if call.session is None:
            return
        with self._cond:
            self._last_turn[call.session] = time.monotonic()
            self._last_turn.move_to_end(call.session)
            while len(self._last_turn) > SESSIONS_KEPT:
                self._last_turn.popitem(last=False)
            if not self.enabled or tokens is None or call.klass != classify.MAIN or len(tokens) < MIN_RESTORE_TOKENS:
                return
            self._pending[(id(target), ticket.slot)] = Pending(target, ticket.slot, call.session, Prompt(tokens),
                                                               time.monotonic() + self.idle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._saver, name="llamabridge-kv-saver", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _saver(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = [key for key, p in self._pending.items() if p.due <= now]
                    if due:
                        break
                    self._cond.wait(min((p.due for p in self._pending.values()), default=now + 3600) - now)
                turns = [self._pending.pop(key) for key in due]
            for turn in turns:
                ticket = turn.target.gate.hold(turn.slot, turn.session)
                if ticket is None:
                    continue  # in use again: its next turn, if it is the session's, schedules a new save
                try:
                    try:
                        written = self._write(turn)
                    finally:
                        turn.target.gate.release(ticket)  # the file is written: the slot is free again
                    if written is not None:
                        self._index(*written)
                except Exception:  # never let one save end the thread
                    log.exception("saving slot %d failed", turn.slot)

    def _save(self, turn: Pending) -> None:
        """Save the slot (held by the caller) and index the file."""
        written = self._write(turn)
        if written is not None:
            self._index(*written)

    def _write(self, turn: Pending) -> tuple[Pending, str, ServerInfo, int, float] | None:
        """Have llama-server write the slot (held by the caller) to a file: the only part of a save
        that needs the slot. Returns what `_index` needs, or None when nothing new was written."""
        upstream = turn.target.upstream
        try:
            info = upstream.fresh_info()  # the model it runs now: the file is named after it
        except ApiError:
            return None
        name = f"{info.identity}-c{info.n_ctx}-{turn.prompt.full}.bin"
        now = time.time()
        with self._cond:
            known = self._files.get(name)
            if known is not None:
                self._files[name] = replace(known, last_used=now, session=turn.session)
        if known is not None:
            self._touch(name, now)
            return None  # this prompt is on disk already; what follows it is the answer, re-evaluated cheaply
        started = time.monotonic()
        try:
            resp = upstream.request("POST", f"/slots/{turn.slot}?action=save", json_body={"filename": name}, timeout=SAVE_TIMEOUT)
        except ApiError as exc:
            self._save_failed(turn, exc.message)
            return None
        took = time.monotonic() - started
        if resp.status_code != 200:
            self._save_failed(turn, f"llama-server answered HTTP {resp.status_code}: {resp.text[:200]}")
            return None
        try:
            saved_tokens = int(json.loads(resp.content).get("n_saved") or 0)
        except (ValueError, AttributeError, TypeError):
            saved_tokens = 0
        return turn, name, info, saved_tokens, took

    def _index(self, turn: Pending, name: str, info: ServerInfo, saved_tokens: int, took: float) -> None:
        """Index a file llama-server wrote; drop the files it makes redundant and those past the budget."""
        try:
            size = os.path.getsize(self._path(name))
        except OSError:
            self._save_failed(turn, f"llama-server saved {name}, but {self.dir} has no such file: KV_CACHE_DIR must be the "
                                    "directory llama-server's --slot-save-path names, as this process sees it")
            return
        if saved_tokens < MIN_RESTORE_TOKENS:
            self._unlink(name)  # the slot held nothing worth keeping (llama-server moved on)
            return
        self.problem = None
        tokens = len(turn.prompt.tokens)
        now = time.time()
        saved = SavedFile(name, info.identity, info.n_ctx, tokens, tuple(turn.prompt.checkpoints), turn.prompt.full,
                          saved_tokens, size, turn.session, now, now)
        with self._cond:
            self._files[name] = saved
            # Files whose whole prompt begins this one's hold nothing this one does not.
            redundant = [f.name for f in self._files.values()
                         if f.name != name and f.model == saved.model and f.tokens <= tokens
                         and turn.prompt.hash_of_first(f.tokens) == f.full]
            kept = sorted((f for f in self._files.values() if f.name not in redundant), key=lambda f: f.last_used)
            total = sum(f.bytes for f in kept)
            over = []
            for f in kept:  # least recently used first; the file just saved is the most recent
                if total <= self.budget:
                    break
                over.append(f.name)
                total -= f.bytes
            self._gauges()
        if self.store is not None:
            try:
                self.store.kv_put(saved.row())
            except sqlite3.Error as exc:
                log.warning("could not index %s in the store (%s): it will not be found after a restart of the proxy", name, exc)
        self._remove(redundant, "superseded")
        self._remove(over, "budget")
        self.metrics.kv_saves.inc()
        self.metrics.kv_save_seconds.observe(took)
        log.info("saved slot %d of session %s: %d tokens, %.1f MB in %.0f ms (%s)", turn.slot, turn.session, saved_tokens,
                 size / 1e6, took * 1000, name)

    def _save_failed(self, turn: Pending, why: str) -> None:
        self.metrics.kv_save_failures.inc()
        if self.problem != why:
            log.warning("could not save slot %d of session %s to disk: %s", turn.slot, turn.session, why)
        self.problem = why

    def _touch(self, name: str, when: float) -> None:
        if self.store is not None:
            try:
                self.store.kv_touch(name, when)
            except sqlite3.Error as exc:
                log.debug("could not note the use of %s in the store: %s", name, exc)

    # -- before a turn -----------------------------------------------------------------------------

    def before_turn(self, target: Target, ticket: Ticket, call: Call, tokens: array | None) -> None:
        """Restore a saved file into the turn's slot when that can only help (module docstring).
        Never raises: the turn goes ahead whatever happens here."""
        if not self.enabled or tokens is None or call.session is None or len(tokens) < MIN_RESTORE_TOKENS:
            return
        try:
            self._before_turn(target, ticket, call, Prompt(tokens))
        except ApiError as exc:  # llama-server went away meanwhile: the turn will say so itself
            log.info("not restoring a prompt cache for session %s: %s", call.session, exc.message)
        except Exception:
            log.exception("restoring a saved prompt cache failed; the turn prefills")
            self.metrics.kv_restores.labels("failed").inc()

    def _before_turn(self, target: Target, ticket: Ticket, call: Call, prompt: Prompt) -> None:
        slot, session = ticket.slot, call.session
        assert session is not None
        with self._cond:
            pending = self._pending.pop((id(target), slot), None)
            matches = sorted(((prompt.shared_with(f), f.last_used, f) for f in self._files.values()),
                             key=lambda m: (m[0], m[1]), reverse=True)
            known_here = self._last_turn.get(session, float("-inf")) > self._restarted_at
        matches = [m for m in matches if m[0] >= MIN_RESTORE_TOKENS]
        if not matches:
            return
        try:
            slots = target.upstream.json("GET", "/slots", timeout=10)
            entries = {s.get("id"): s for s in slots if isinstance(s, dict)}
        except (ApiError, AttributeError, TypeError):
            return  # /slots disabled or llama-server busy elsewhere: no way to tell, prefill
        entry = entries.get(slot) or {}
        empty = "id_task" not in entry
        # A slot this proxy used that llama-server shows empty: llama-server restarted.
        lost = {s for s, e in entries.items() if isinstance(s, int) and "id_task" not in e
                and _ran_a_session(target.gate.last_user(s) if s != slot else ticket.previous)}
        if lost:
            log.info("llama-server at %s no longer holds what slots %s held (it restarted): sessions continue from "
                     "their saved prompt caches", target.upstream.base, sorted(lost))
            with self._cond:
                self._restarted_at = time.monotonic()
            known_here = False
            target.gate.forget(lost - {slot})
        if not empty:
            if known_here:
                return  # llama-server has this session's cache, in the slot or in its own host-memory cache
            held = self.tracker.tokens_of(ticket.previous) if ticket.previous else None
            shared = common_prefix(held, prompt.tokens) if held is not None else 0
            if matches[0][0] <= shared + CHECKPOINT:
                return
        info = target.upstream.fresh_info()  # the model llama-server runs now, not 30 s ago
        n_ctx = int(entry.get("n_ctx") or info.n_ctx or 0)
        fits = [m for m in matches if m[2].model == info.identity and (n_ctx <= 0 or m[2].saved_tokens < n_ctx)]
        if not fits:
            self.metrics.kv_restores.labels("refused").inc()
            other = matches[0][2]
            log.info("not restoring %s for session %s: saved %s (model %s, %d tokens), llama-server now runs model %s with "
                     "%d tokens per slot", other.name, session, "for another model" if other.model != info.identity
                     else "with a longer context", other.model, other.saved_tokens, info.identity, n_ctx)
            return
        if pending is not None and pending.session != session and not empty:
            self._save(pending)  # what the slot holds goes to disk before it is replaced
        self._restore(target, slot, call, fits[0][2])

    def _restore(self, target: Target, slot: int, call: Call, saved: SavedFile) -> None:
        if not os.path.isfile(self._path(saved.name)):
            self.metrics.kv_restores.labels("failed").inc()
            log.warning("saved prompt cache %s is gone from %s; session %s prefills", saved.name, self.dir, call.session)
            self._remove([saved.name], "missing")
            return
        started = time.monotonic()
        try:
            resp = target.upstream.request("POST", f"/slots/{slot}?action=restore", json_body={"filename": saved.name},
                                           timeout=SAVE_TIMEOUT)
        except ApiError as exc:
            self._restore_failed(saved, call, exc.message)
            return
        if resp.status_code != 200:
            self._restore_failed(saved, call, f"HTTP {resp.status_code}: {resp.text[:200]}")
            return
        try:
            restored = int(json.loads(resp.content).get("n_restored") or 0)
        except (ValueError, AttributeError, TypeError):
            restored = 0
        now = time.time()
        with self._cond:
            if saved.name in self._files:
                self._files[saved.name] = replace(self._files[saved.name], last_used=now)
        self._touch(saved.name, now)
        call.kv_restored = restored
        self.metrics.kv_restores.labels("restored").inc()
        self.metrics.kv_restored_tokens.inc(restored)
        log.info("restored %d tokens of session %s's prompt cache into slot %d from %s in %.0f ms", restored,
                 saved.session or "-", slot, saved.name, (time.monotonic() - started) * 1000)

    def _restore_failed(self, saved: SavedFile, call: Call, why: str) -> None:
        """llama-server could not load the file (it cleared the slot): the turn prefills. A file it
        calls invalid is deleted, so it is not tried again."""
        self.metrics.kv_restores.labels("failed").inc()
        log.warning("could not restore %s for session %s (%s); the turn prefills", saved.name, call.session, why)
        if "invalid" in why or "Invalid" in why:
            self._remove([saved.name], "missing")
