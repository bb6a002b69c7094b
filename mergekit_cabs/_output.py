"""Writing results: the output directory, number formatting, plot set-up.

Shared by analyze and tune.  Files are written into a staging directory inside
the output directory (so moving them in is a rename on one file system, also
when --out is a mount point or its parent is read-only) and moved in at the
end (`publish`), the result file last, so a failure never leaves a file that
looks complete.  A staging directory is removed on any failure, on Ctrl-C and
on SIGTERM; one a killed run left (SIGKILL, power loss) is removed by the next
run into that directory (`clean_stale`).

A run holds --out for its whole length (`out_lock`): an advisory lock
(`fcntl.flock`) on a lock file in it, which the kernel releases when the
process ends however it ends (kill -9 included), so a second run into the
same directory refuses at start, naming the first one's pid, and a killed
run never blocks the next.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mergekit_cabs.params import CabsError

PLOTS_HINT = ('pip install ".[plot]" in a clone of mergekit-cabs ("mergekit-cabs[plot]" once on PyPI) '
              'gets the plots (matplotlib)')
STAGING = ".mergekit-cabs-staging-"  # + "<pid>-<random>": a staging directory of ours
STALE_AFTER_S = 3600  # a staging directory this old is a dead run's, whatever its pid
LOCK_NAME = ".mergekit-cabs.lock"  # in --out while a run holds it (holds the pid)


class WriteError(CabsError):
    """An output file could not be written (a full disk, no permission...)."""


def check_out_dir(out: Path, force: bool, names: Sequence[str], error: type[CabsError] = CabsError) -> None:
    """Refuse a file, or a directory that holds files unless `force`
    (staging directories of ours do not count; dead runs' ones are removed)."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a directory")
    if not out.is_dir():
        return
    try:
        clean_stale(out, names)
        used = any(not entry.name.startswith(STAGING) and entry.name != LOCK_NAME for entry in out.iterdir())
    except OSError as problem:
        raise error(f"--out {out} cannot be read: {problem.strerror or problem}") from None
    if used and not force:
        raise error(
            f"--out {out} already holds files; pass --force to replace its "
            f"{', '.join(names)} (other files are left alone), or give another --out"
        )


def _running(pid: int) -> bool:
    """Whether process `pid` runs here (True when it cannot be told)."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process; age decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, say
        return True
    return True


def _dead_run(entry: Path, owned: re.Pattern, names: Sequence[str]) -> bool:
    """Whether `entry` is a staging directory a run that is over left behind."""
    match = owned.fullmatch(entry.name)
    if not match or not entry.is_dir() or entry.is_symlink():
        return False
    if not match.groups():  # the earlier layout, next to --out: only if it holds nothing but our files
        return all(f.name in names for f in entry.iterdir())
    return not _running(int(match.group(1))) or time.time() - entry.stat().st_mtime > STALE_AFTER_S


def clean_stale(out: Path, names: Sequence[str] = ()) -> list[Path]:
    """Remove the staging directories killed runs left: ours in `out`
    (``.mergekit-cabs-staging-<pid>-*`` whose process is gone or that are over
    an hour old), and ``.<out name>-xxxxxxxx`` next to `out` (where earlier
    releases staged) that hold only files of `names`.  Returns those removed."""
    out = Path(out)
    places = [(out, re.compile(re.escape(STAGING) + r"(\d+)-\w+")),
              (out.parent, re.compile(re.escape(f".{out.name}-") + r"[a-z0-9_]{8}"))]
    removed = []
    for where, owned in places:
        with contextlib.suppress(OSError):
            for entry in list(where.iterdir()):
                if _dead_run(entry, owned, names):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def _terminate_as_exit():
    """Within the block, SIGTERM raises SystemExit (so `finally` clauses run)
    when it would otherwise end the process at once."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def publish(out: Path, names: Sequence[str], build: Callable[[Path], list[str]]) -> list[str]:
    """Let `build` write files into a staging directory inside `out`, then
    move them in, in the order it returns them (put the result file last: its
    presence means every file is there).  Earlier files of `names` in `out`
    are replaced or removed; a failure leaves no new file that looks complete,
    no staging directory, and no empty `out` that this call created.  Returns the
    names written; WriteError (one line) when a file cannot be written."""
    out = Path(out)
    created, written = not out.exists(), None
    try:
        with _terminate_as_exit():
            out.mkdir(parents=True, exist_ok=True)
            clean_stale(out, names)
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=out))
            try:
                files = build(staging)
                for name in names:
                    (out / name).unlink(missing_ok=True)
                for name in files:
                    os.replace(staging / name, out / name)
                written = files
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as problem:
        raise WriteError(f"could not write {out}: {problem.strerror or problem}") from None
    finally:
        if created and written is None:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: nothing was moved in
    return written


def _lock_file(path: Path):
    """The lock file at `path`, opened and flock-ed (exclusive, not waiting):
    (file, None), or (None, the holder's pid as written, "" when unknown) when
    another process holds it.  Retries when the file it locked was removed or
    replaced meanwhile (its holder was ending), so the lock is on the file
    that is there."""
    import fcntl

    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip()
            handle.close()
            return None, pid
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return handle, None
        handle.close()


@contextlib.contextmanager
def out_lock(out: Path, error: type[CabsError] = CabsError, label: str = "--out"):
    """Hold --out `out` (named `label` in messages) for the block: created if missing, with a lock file
    (`LOCK_NAME`, holding this process's pid) flock-ed in it.  Another process
    holding it is `error` at once, naming its pid; a process that died holding
    it does not count (the kernel dropped its lock).  On leaving, the lock
    file is removed, and `out` too when this call created it and it is
    empty.  Where flock is missing (Windows), nothing is locked."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{label} {out} is a file; give a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as problem:
        raise error(f"{label} {out} cannot be created: {problem.strerror or problem}") from None
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    path = out / LOCK_NAME
    try:
        handle, holder = _lock_file(path)
    except OSError as problem:
        raise error(f"{label} {out} cannot be locked: {problem.strerror or problem}") from None
    if handle is None:
        raise error(f"{label} {out} is in use by another run (pid {holder or 'unknown'}); wait for it to end or "
                    f"give another {label}")
    try:
        with contextlib.suppress(OSError):  # the pid is for the refusal's message only: a full disk may lose it
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), f"{os.getpid()}\n".encode())  # unbuffered: close() has nothing to flush
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            handle.close()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty


def fmt(x: float | None, spec: str = ".4f") -> str:
    """`x` formatted, or '-' for a missing value."""
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    """A share as a percentage with two decimals, or '-'."""
    return "-" if x is None else f"{100 * x:.2f}%"


def short_names(labels: Sequence[str]) -> list[str]:
    """Last path component of each model, unless two would look the same."""
    short = [os.path.basename(label.rstrip("/\\")) or label for label in labels]
    return short if len(set(short)) == len(short) else list(labels)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
