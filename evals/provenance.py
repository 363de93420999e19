"""Provenance: what produced a run (versions, git hash) and content fingerprints (config hash,
model files, input images), so a resume can tell when something underneath it changed.

Content fingerprints read every byte once: a model folder is hashed file by file in full (a
negated tensor in the middle of a 14 GB file changes it), and so is every input image. A
digest cache keyed by (path, size, mtime, ctime, inode) keeps a resume from re-reading them;
ctime cannot be set back by `touch`, so an in-place rewrite is always seen.

The cache lives in tasks.cache.cache_dir("digests.sqlite"): $CM3EVAL_CACHE, else
$XDG_CACHE_HOME/cm3eval, else ~/.cache/cm3eval — the one cache variable of the package. Several
processes share it (torchrun ranks, a `cm3eval score` beside a run): every write is its own
autocommitted statement in WAL mode, so no process ever holds a write transaction open while it
reads a file, and another process digesting at the same time never waits on "database is locked".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tasks.cache import cache_dir

log = logging.getLogger("cm3eval")

PACKAGE = "cm3eval"
_CHUNK = 1 << 22
BANK_INFO = "bank.json"  # cm3leon.bank.INFO_FILE: the file that makes a folder a retrieval bank


# ----------------------------------------------------------------------------- versions
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # not installed (a source checkout): read pyproject.toml
        try:
            import tomllib

            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return str(tomllib.loads(pyproject.read_text())["project"]["version"]) + "+src"
        except Exception:
            return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {PACKAGE: package_version(), "python": platform.python_version()}
    for dist_name in ("torch", "numpy", "pillow", "pycocotools", "pycocoevalcap", "scipy", "tokenizers"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            continue
    return out


def git_hash() -> str | None:
    here = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- config hash
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(hashed: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key (old -> new)' for every flattened key whose value differs."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if canonical_json(a.get(k)) != canonical_json(b.get(k)):
            out.append(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})")
    return out


# ----------------------------------------------------------------------------- content digests
class DigestCache:
    """sha256 of whole files, remembered by (path, size, mtime, ctime, inode) in a small SQLite file.
    A cache that cannot be opened (read-only home) only costs time: digests are computed anyway.

    The connection is in autocommit mode (`isolation_level=None`): each INSERT commits at once, so
    no write transaction (and SQLite's write lock) stays open across the hashing of the next
    files, and a second process writing at the same time waits milliseconds, never the whole
    `timeout` (30 s) that would end in "database is locked"."""

    BUSY_TIMEOUT_S = 30.0  # a single-row write waits at most this long for another's (milliseconds in practice)

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "digests.sqlite"
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes actually read (the tests check that a resume reads none)

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_S, check_same_thread=False,
                                     isolation_level=None)
                _use_wal(db, self.path)
                # a commit without an fsync: a cache entry lost to a power cut only costs a re-read
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stamp TEXT, sha256 TEXT)")
                self._db = db
            except (OSError, sqlite3.Error) as e:
                log.debug("digest cache %s unavailable (%s); hashing without it", self.path, e)
                return None
        return self._db

    def _lookup(self, path: Path, stamp: str) -> str | None:
        with self._lock:
            db = self._conn()
            if db is None:
                return None
            try:
                row = db.execute("SELECT stamp, sha256 FROM digests WHERE path=?", (str(path),)).fetchone()
            except sqlite3.Error:
                return None
        return str(row[1]) if row is not None and row[0] == stamp else None

    def _store(self, path: Path, stamp: str, sha: str) -> None:
        with self._lock:
            db = self._conn()
            if db is None:
                return
            try:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", (str(path), stamp, sha))
            except sqlite3.Error as e:  # a cache that cannot be written only costs a re-read later
                log.debug("digest cache write failed: %s", e)

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stamp = _stamp(path)
        cached = self._lookup(path, stamp)
        if cached is not None:
            return cached
        sha = _sha256_file(path)  # outside any lock or transaction: the slow part
        self.hashed_bytes += path.stat().st_size
        self._store(path, stamp, sha)
        return sha

    def remember(self, path: Path, sha: str) -> None:
        """Record the sha256 of a file this process just wrote (its bytes hashed in memory), so a
        resume compares it by stat alone until the file is touched."""
        path = Path(path).resolve()
        self._store(path, _stamp(path), sha)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _use_wal(db: sqlite3.Connection, path: Path, tries: int = 20) -> None:
    """WAL mode: readers never block the writer nor the reverse. Switching needs a moment alone
    with the file, which SQLite refuses at once (no busy wait) while another process is opening
    the same fresh cache; the mode is persistent, so a later try, or that other process, sets it.
    On a filesystem without shared memory (some network mounts) the rollback journal stays:
    slower under contention, still correct."""
    for attempt in range(tries):
        try:
            if str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal":
                return
        except sqlite3.Error as e:
            if "locked" not in str(e) and "busy" not in str(e):
                log.debug("digest cache %s: WAL unavailable (%s)", path, e)
                return
        time.sleep(0.01 * (attempt + 1))
    log.debug("digest cache %s: still in its rollback-journal mode", path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_default_cache: DigestCache | None = None


def digest_cache() -> DigestCache:
    """The process's cache (re-created when $CM3EVAL_CACHE changes, as tests do)."""
    global _default_cache
    want = cache_dir() / "digests.sqlite"
    if _default_cache is None or _default_cache.path != want:
        if _default_cache is not None:
            _default_cache.close()
        _default_cache = DigestCache(want)
    return _default_cache


def file_digest(path: Path) -> str:
    """16 hex digits of the file's sha256 (whole content; cached)."""
    return digest_cache().digest(Path(path))[:16]


def folder_digests(folder: Path) -> dict[str, str]:
    """{relative path: file_digest} of every file under folder (hidden files excluded), so a
    refused resume can name the file that changed. A subfolder holding a retrieval bank
    (bank.json) is ONE entry, "bank/": its tree_digest (a bank holds thousands of images)."""
    folder = Path(folder)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if (here / d / BANK_INFO).is_file():
                dirnames.remove(d)
                out[(here / d).relative_to(folder).as_posix() + "/"] = tree_digest(here / d)
        for name in filenames:
            if not name.startswith("."):
                out[(here / name).relative_to(folder).as_posix()] = file_digest(here / name)
    return dict(sorted(out.items()))


def tree_digest(folder: Path) -> str:
    """ONE digest (16 hex digits) of a folder's whole content: every file's relative path and
    full-content digest (each cached), so a byte changed anywhere in it changes the digest, and a
    resume reads no file again."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def load_verified_bank(folder: Path) -> Any:
    """A retrieval bank (cm3leon.bank.MemoryBank) loaded with bank.json's content hash checked
    against embeddings.npy and meta.jsonl. The check reads the bank once: its success is remembered
    in the digest cache by those files' stamps, and repeated only when one of them changes.
    Raises ValueError (hash mismatch, bad format) or FileNotFoundError."""
    from cm3leon.bank import EMB_FILE, META_FILE, MemoryBank

    folder = Path(folder).resolve()
    cache = digest_cache()
    key = folder / f"{BANK_INFO}#verified"
    try:
        stamp = ";".join(_stamp(folder / f) for f in (BANK_INFO, EMB_FILE, META_FILE))
    except OSError:
        stamp = None  # MemoryBank.load names the missing file
    if stamp is not None and cache._lookup(key, stamp) is not None:
        return MemoryBank.load(folder)
    bank = MemoryBank.load(folder, verify_hash=True)
    if stamp is not None:
        cache._store(key, stamp, str(bank.content_hash))
    return bank
