"""THE run-folder contract: the only code that reads or writes run files (engine and reports use it).

    RUN/.cm3eval.lock                  the run lock: pid + host of the process running in RUN
    RUN/metrics.json                   {"run": provenance, "tasks": {TASK: entry}}, merged per task
    RUN/TASK/config.json               resolved spec, overrides, fingerprints, config hash
    RUN/TASK/samples/rank-RRRRR.jsonl  one line per finished sample, appended, flushed, fsync'd
    RUN/TASK/images/*.png              written (temp file + rename) before the line naming them
    RUN/TASK/features/METRIC.npz       a set metric's per-sample feature rows (FD): ids, features,
                                       the reference's mean and covariance (compare pairs on them)

The one torn-line rule (read_samples): a sample line is finished when it ends with a newline
and parses as a JSON object with an "id" and an integer "index". The last line of a file
without its newline is a write cut off by a kill or a full disk: it is skipped (and the sample
recomputed); SampleWriter cuts it before appending. Every write is fsync'd line by line, so any
other malformed line is damage, never a kill: it is an error naming file and line.

Every byte reaches the disk through `_os_write` (one seam, where the fault tests inject ENOSPC);
a full disk is a one-line DiskFullError, and the same command resumes once space is freed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from cm3leon.errors import Cm3evalError

log = logging.getLogger("cm3eval")

CONFIG = "config.json"
METRICS = "metrics.json"
SAMPLES = "samples"
IMAGES = "images"
FEATURES = "features"
LOCK = ".cm3eval.lock"
_METRICS_LOCK = ".metrics.lock"  # a short flock around the read-modify-write of metrics.json
_TMP_MARK = ".tmp-"

_os_write = os.write  # the one place bytes reach the disk (the fault tests replace it)


class RunFolderError(Cm3evalError):
    """A run folder cannot be read or written as the contract says; one-line message."""


class DiskFullError(RunFolderError):
    """No space left where the run writes; the same command resumes once space is freed."""


class RunLockedError(RunFolderError):
    """Another live process holds the run folder's lock."""


# ----------------------------------------------------------------------------- writing bytes
def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _disk_error(e: OSError, path: Path) -> RunFolderError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{path}: no space left on device; free some space and run the same command again "
                             "(finished samples are kept)")
    return RunFolderError(f"{path}: cannot write ({e.strerror or e})")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = _os_write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via `.NAME.tmp-PID` + fsync + rename: a reader sees the old file or the new one, never
    half of one. On any failure the temp file is removed (a full disk leaves no litter)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _disk_error(e, path) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    """Remove a temp file; where that fails too (a read-only file system refuses even the unlink
    of a file that is not there), the first error is the one to report."""
    with _ignored_oserror():
        path.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_temp_files(folder: Path) -> int:
    """Remove `.NAME.tmp-PID` files left by dead processes under folder (a kill between write and
    rename); files of live processes are left alone. Returns how many were removed."""
    removed = 0
    for p in Path(folder).rglob(f".*{_TMP_MARK}*"):
        pid = p.name.rsplit(_TMP_MARK, 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        try:
            p.unlink()
            removed += 1
        except OSError:
            continue
    return removed


# ----------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """RUN/metrics.json, {} when the run has none yet."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return data


def read_task_config(run_dir: Path, task: str) -> dict[str, Any] | None:
    path = Path(run_dir) / task / CONFIG
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return data


def task_names(run_dir: Path) -> list[str]:
    """Tasks of a run: those in metrics.json and every subfolder holding a config.json."""
    run_dir = Path(run_dir)
    names = set((read_metrics(run_dir).get("tasks") or {}).keys())
    if run_dir.is_dir():
        names |= {p.name for p in run_dir.iterdir() if p.is_dir() and (p / CONFIG).is_file()}
    return sorted(names)


def is_finished_run(path: Path) -> bool:
    """A folder holding a metrics.json with at least one task entry (a sweep parent, an empty
    folder left by a failed start, or an unreadable metrics.json are not runs)."""
    try:
        tasks = read_metrics(Path(path)).get("tasks")
    except RunFolderError:
        return False
    return isinstance(tasks, dict) and any(isinstance(e, dict) for e in tasks.values())


def sample_files(task_dir: Path) -> list[Path]:
    return sorted((Path(task_dir) / SAMPLES).glob("rank-*.jsonl"))


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of the finished lines of one samples file (the torn-line rule)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        return
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with its newline; else a cut-off write
    if torn.strip():
        log.debug("%s: skipping a torn last line (a write cut off by a kill)", path)
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunFolderError(f"{path}:{lineno}: malformed sample line (damaged file?); delete that line "
                                 "to recompute its sample") from None
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("index"), int):
            raise RunFolderError(f"{path}:{lineno}: a sample line must be a JSON object with an id and an "
                                 "integer index")
        yield lineno, rec


def read_samples(task_dir: Path) -> dict[str, dict[str, Any]]:
    """THE reader: finished sample lines of every rank by id, ordered by (index, id). Where one id
    has several lines (a retried failure, a regenerated damaged output, a merge cut short) a
    success wins over a failure, and a later success over an earlier one."""
    out: dict[str, dict[str, Any]] = {}
    for path in sample_files(task_dir):
        for _, rec in _lines(path):
            key = str(rec["id"])
            old = out.get(key)
            if old is None or old.get("failure") is not None or rec.get("failure") is None:
                out[key] = rec
    return dict(sorted(out.items(), key=lambda kv: (kv[1]["index"], kv[0])))


# ----------------------------------------------------------------------------- writing samples
class SampleWriter:
    """Appends lines to samples/rank-RRRRR.jsonl; each line is written, then fsync'd, at once."""

    def __init__(self, task_dir: Path, rank: int) -> None:
        self.path = Path(task_dir) / SAMPLES / f"rank-{rank:05d}.jsonl"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise _disk_error(e, self.path) from None

    def _repair(self) -> None:
        """Cut a torn last line (a kill mid-write) so the next append starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.truncate(self.path, keep)
            log.warning("%s: dropped a torn last line (a previous run was cut off mid-write); it is recomputed",
                        self.path)

    def write(self, rec: dict[str, Any]) -> None:
        assert self.fd is not None, "SampleWriter is closed"
        line = (json.dumps(rec, ensure_ascii=False, default=json_default) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            _write_all(self.fd, line)
            os.fsync(self.fd)
        except OSError as e:
            with _ignored_oserror():
                os.ftruncate(self.fd, size)  # no half line left behind (shrinking needs no space)
            raise _disk_error(e, self.path) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ignored_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, OSError)


def rewrite_samples(task_dir: Path, records: dict[str, dict[str, Any]]) -> Path:
    """All records into rank-00000.jsonl sorted by index, the other rank files removed. The rename
    is atomic; a crash before the removals leaves duplicate lines, which read_samples merges."""
    lines = [json.dumps(r, ensure_ascii=False, default=json_default) + "\n"
             for r in sorted(records.values(), key=lambda r: (r["index"], str(r["id"])))]
    target = Path(task_dir) / SAMPLES / "rank-00000.jsonl"
    atomic_write_bytes(target, "".join(lines).encode())
    for p in sample_files(task_dir):
        if p != target:
            p.unlink(missing_ok=True)
    return target


def save_png(img: Image.Image, path: Path, max_side: int | None = None) -> str:
    """PNG via temp file + rename, so a kill never leaves a half-written image under its name.
    Returns the first 16 hex digits of its sha256 (the sample line records it; see
    unreadable_images); the digest cache learns it too, so a resume needs only a stat."""
    from evals.provenance import digest_cache

    if max_side is not None and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    sha = hashlib.sha256(data).hexdigest()
    digest_cache().remember(path, sha)
    return sha[:16]


def unreadable_images(task_dir: Path, rec: dict[str, Any]) -> list[str]:
    """The image files of a sample line that are missing, damaged or changed. Lines record each
    file's content digest ("image_digests", the digest cache answers by stat until the file is
    touched, so a flipped byte of the same size is seen); lines of runs that recorded sizes
    ("image_bytes") are checked by size; lines with neither get PIL's verify (chunk structure and
    CRCs, no pixel decoding)."""
    from evals.provenance import file_digest

    rels = list((rec.get("images") or {}).values()) + list(rec.get("candidates") or [])
    digests, sizes = rec.get("image_digests"), rec.get("image_bytes")
    bad = []
    for rel in rels:
        path = Path(task_dir) / rel
        try:
            if isinstance(digests, dict) and rel in digests:
                if file_digest(path) != digests[rel]:
                    bad.append(str(rel))
            elif isinstance(sizes, dict) and rel in sizes:
                if path.stat().st_size != sizes[rel]:
                    bad.append(str(rel))
            else:
                with Image.open(path) as im:
                    im.verify()
        except Exception:  # noqa: BLE001 - any decoder complaint means: regenerate
            bad.append(str(rel))
    return bad


def damaged_output(task_dir: Path, rec: dict[str, Any], output_modality: str) -> str | None:
    """Why a finished sample line cannot be scored as it stands (it is then regenerated): a text
    prediction that is not a string (a hand-edited NaN), or an image file missing or changed."""
    if output_modality == "text" and not isinstance(rec.get("prediction"), str):
        return f"its prediction is {rec.get('prediction')!r}, not a string"
    bad = unreadable_images(task_dir, rec)
    return f"{bad[0]} is missing or changed since it was written" if bad else None


def write_task_config(task_dir: Path, config: dict[str, Any]) -> None:
    task_dir = Path(task_dir)
    try:
        (task_dir / SAMPLES).mkdir(parents=True, exist_ok=True)
        (task_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(e, task_dir) from None
    atomic_write_json(task_dir / CONFIG, config)


def features_path(task_dir: Path, metric: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in metric)
    return Path(task_dir) / FEATURES / f"{safe}.npz"


REFERENCE_KEYS = (("ref_mu", "ref_sigma"), ("ref_features",))  # a Fréchet distance's moments, or a whole set


def write_features(task_dir: Path, metric: str, ids: list[str], features: np.ndarray, **reference: np.ndarray) -> Path:
    """The per-sample feature rows behind a set metric (row i belongs to sample ids[i]) and the
    reference it was measured against (REFERENCE_KEYS: FID's moments `ref_mu` `ref_sigma`, or the
    reference rows `ref_features` for CMMD and PRDC), as one .npz (float32 rows: what the encoders
    emit, so they are stored exactly; moments in float64)."""
    if tuple(sorted(reference)) not in {tuple(sorted(k)) for k in REFERENCE_KEYS}:
        raise ValueError(f"write_features: a reference is one of {REFERENCE_KEYS}, got {sorted(reference)}")
    path = features_path(task_dir, metric)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(e, path.parent) from None
    ref = {k: np.asarray(v, np.float32 if k == "ref_features" else np.float64) for k, v in reference.items()}
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray([str(i) for i in ids]), features=np.asarray(features, np.float32), **ref)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_features(task_dir: Path, metric: str) -> dict[str, np.ndarray] | None:
    """What write_features saved ({"ids", "features"} and the reference's keys), or None when absent."""
    path = features_path(task_dir, metric)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = next((k for k in REFERENCE_KEYS if all(x in z.files for x in k)), None)
            if keys is None:
                raise KeyError(f"no reference ({' or '.join('+'.join(k) for k in REFERENCE_KEYS)})")
            out = {k: z[k] for k in ("ids", "features", *keys)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise RunFolderError(f"{path}: unreadable feature file ({e})") from None
    if out["features"].ndim != 2 or len(out["ids"]) != len(out["features"]):
        raise RunFolderError(f"{path}: {len(out['ids'])} ids for features of shape {out['features'].shape}")
    return out


# ----------------------------------------------------------------------------- metrics.json
def merge_task_metrics(run_dir: Path, run_meta: dict[str, Any], entries: dict[str, dict[str, Any]]) -> Path:
    """RUN/metrics.json: these task entries merged into what the file holds, as one atomic
    read-modify-write under an flock, so two processes finishing tasks at once lose nothing."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    try:
        lock_fd = os.open(run_dir / _METRICS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _disk_error(e, run_dir / _METRICS_LOCK) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        data: dict[str, Any] = {"run": {}, "tasks": {}}
        old_run: dict[str, Any] = {}
        try:
            old = read_metrics(run_dir)
            if isinstance(old.get("tasks"), dict):
                data["tasks"] = old["tasks"]
            old_run = old["run"] if isinstance(old.get("run"), dict) else {}
        except RunFolderError as e:
            log.warning("%s; rewriting it with this run's tasks only", e)
        commands = _commands(old_run, run_meta)
        data["run"] = {**run_meta, **({"commands": commands} if commands else {})}
        data["tasks"].update(entries)
        atomic_write_json(path, data)
    finally:
        os.close(lock_fd)  # closing releases the flock
    return path


def _commands(old_run: dict[str, Any], run_meta: dict[str, Any]) -> list[list[str]]:
    """Every distinct command line that wrote into this run folder, oldest first (a resumed or
    extended run is built by several), so the report can show how the run was made."""
    cmds = [c for c in old_run.get("commands") or [] if isinstance(c, list)]
    if not cmds and isinstance(old_run.get("argv"), list):
        cmds = [old_run["argv"]]
    argv = run_meta.get("argv")
    if isinstance(argv, list) and argv not in cmds:
        cmds.append(list(argv))
    return cmds


# ----------------------------------------------------------------------------- the run lock
@dataclass
class LockHolder:
    pid: int
    host: str
    started: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}" + (f", since {self.started}" if self.started else "")


def _holder_of(fd: int) -> LockHolder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        d = json.loads(raw) if raw.strip() else None
        return LockHolder(int(d["pid"]), str(d["host"]), str(d.get("started", ""))) if isinstance(d, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """One process at a time in a run folder. An flock on RUN/.cm3eval.lock, whose content names
    the holder (pid, host). The kernel drops an flock when its process dies, so a lock file left by
    a killed run is stale by construction: taking it succeeds, with a note naming the dead holder.
    Where the file system has no flock, a holder on this host whose pid is gone is stale."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(10):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if not self._try_lock(fd):
                    continue
                self._fd = fd
                return self
        except OSError as e:
            raise _disk_error(e, self.path) from None
        raise RunFolderError(f"{self.path}: could not take the run lock (it keeps changing hands)")

    def _try_lock(self, fd: int) -> bool:
        """True when fd now holds the lock; False to retry (the file was replaced meanwhile)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(fd)
            os.close(fd)
            who = holder.describe() if holder else "another process"
            raise RunLockedError(f"{self.run_dir} is in use by {who} (lock {self.path}); wait for it, or use "
                                 "another --out") from None
        except OSError as e:  # no flock on this file system: judge by pid on this host
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self._check_pid_holder(fd)
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and our flock
            os.close(fd)
            return False
        old = _holder_of(fd)
        if old is not None and old.pid != os.getpid():
            log.info("%s: took over a stale lock of %s (that process is gone)", self.path, old.describe())
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                           "argv": sys.argv}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        _write_all(fd, body)
        return True

    def _check_pid_holder(self, fd: int) -> None:
        holder = _holder_of(fd)
        if holder is None or holder.pid == os.getpid():
            return
        if holder.host != socket.gethostname() or _pid_alive(holder.pid):
            os.close(fd)
            raise RunLockedError(f"{self.run_dir} is in use by {holder.describe()} (lock {self.path}); if that "
                                 "process is gone, delete the lock file")

    def release(self) -> None:
        if self._fd is None:
            return
        with _ignored_oserror():
            os.unlink(self.path)  # while still holding it: the next taker makes a fresh file
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: Path) -> LockHolder | None:
    """Who holds RUN's lock now (None: nobody alive does)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_of(fd)
        except OSError:
            h = _holder_of(fd)
            return h if h is not None and _pid_alive(h.pid) else None
        return None
    finally:
        os.close(fd)
