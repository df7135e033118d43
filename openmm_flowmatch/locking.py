"""Output locks and resume settings: one job per output, continued only with the same settings.

Every long job (``generate``, ``train-flow``, ``teacher``, ``train-ff``, ``simulate``, the
data-efficiency benchmark's units) takes an exclusive ``fcntl.flock`` on a lock file beside its
output before it writes anything. A second process started on the same output is refused at once
with one line naming the output and the PID (and command) of the process that holds it. The
operating system releases the lock when the holder exits, however it exits (also on SIGKILL or a
crash), so a stale lock never blocks a re-run.

* a directory output (``generate --out``, ``simulate --out``) is locked through
  ``<directory>/.openmm-flowmatch.lock`` (left in place: it is tiny and hidden);
* a file output (a checkpoint, a flow or network file, a teacher file) through
  ``<directory>/.<file name>.lock``, removed again when the job ends normally.

Locks are re-entrant within one process (a command that locks a directory may call a library
function that locks it again). POSIX only (``fcntl``); on NFS ``flock`` may not exclude processes
on other machines.

:func:`check_settings` records the settings of a resumable job beside its output and refuses a
re-run whose settings differ, naming each differing setting.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "DIRECTORY_LOCK_NAME", "OutputLockedError", "SettingsChangedError", "OutputLock", "lock_directory", "lock_file",
    "lock_outputs", "holds_directory_lock", "check_settings",
]

logger = logging.getLogger(__name__)

DIRECTORY_LOCK_NAME = ".openmm-flowmatch.lock"
"""Name of the lock file inside a locked output directory."""

_HELD: dict[Path, "OutputLock"] = {}
"""Locks this process holds, by lock-file path (for re-entrancy)."""


class OutputLockedError(RuntimeError):
    """Another live process holds the lock of this output."""


class SettingsChangedError(ValueError):
    """A job was re-run on an existing output with other settings."""


def _holder(lock_path: Path) -> str:
    """``"PID 123: openmm-flowmatch simulate ..."`` as written by the holder, or what is known."""
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text.splitlines()[0][:200] if text else "PID unknown (it is still starting)"


def _command_line() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([name, *sys.argv[1:]])


class OutputLock:
    """An exclusive, crash-safe lock of one output (directory or file).

    Parameters
    ----------
    target
        The output the lock protects (named in messages).
    lock_path
        The lock file (created if missing).
    remove
        Delete the lock file on :meth:`release` (file outputs); directory locks keep it.
    """

    def __init__(self, target: Path, lock_path: Path, remove: bool) -> None:
        self.target, self.lock_path, self.remove = target, lock_path, remove
        self._handle: Any = None
        self._depth = 0

    def acquire(self) -> "OutputLock":
        """Take the lock (or, if this process holds it already, count one more user).

        Raises
        ------
        OutputLockedError
            When another process holds it.
        """
        held = _HELD.get(self.lock_path)
        if held is not None:
            held._depth += 1
            return held
        while True:
            handle = self._open()
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise OutputLockedError(
                    f"{self.target} is in use by another openmm-flowmatch process ({_holder(self.lock_path)}); "
                    "wait for it to finish or stop it, or choose another output"
                ) from None
            if self._same_file(handle):
                break
            handle.close()  # the previous holder removed the file between our open and flock: retry
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()}: {_command_line()}\n")
        handle.flush()
        self._handle, self._depth = handle, 1
        _HELD[self.lock_path] = self
        return self

    def _open(self) -> Any:
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.lock_path, "a+")
        except OSError as problem:
            raise OutputLockedError(
                f"cannot create the lock file {self.lock_path} ({problem.strerror or problem}); "
                "choose a writable output"
            ) from None

    def _same_file(self, handle: Any) -> bool:
        try:
            return os.stat(self.lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Give one use back; the last one unlocks (and removes a file lock's file)."""
        self._depth -= 1
        if self._depth > 0 or self._handle is None:
            return
        _HELD.pop(self.lock_path, None)
        if self.remove:
            self.lock_path.unlink(missing_ok=True)
        else:
            self._handle.truncate(0)
        self._handle.close()  # closing the descriptor releases the flock
        self._handle = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        _HELD.get(self.lock_path, self).release()


def lock_directory(directory: str | os.PathLike) -> OutputLock:
    """A lock of an output directory (created if missing); use as ``with lock_directory(d):``."""
    directory = Path(os.path.abspath(directory))  # one key per directory, however it is spelled
    return OutputLock(directory, directory / DIRECTORY_LOCK_NAME, remove=False)


def lock_file(path: str | os.PathLike) -> OutputLock:
    """A lock of one output file, through ``.<name>.lock`` beside it."""
    path = Path(os.path.abspath(path))
    return OutputLock(path, path.with_name(f".{path.name}.lock"), remove=True)


@contextmanager
def lock_outputs(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Lock several output files at once (``None`` entries are skipped; each file locked once)."""
    locks = []
    try:
        for path in dict.fromkeys(Path(os.path.abspath(p)) for p in paths if p is not None):
            locks.append(lock_file(path).acquire())
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def holds_directory_lock(argument: str, check: Callable[[Path], None] | None = None):
    """Decorator: run the function holding :func:`lock_directory` of its argument ``argument``.

    ``check(directory)``, if given, runs first (e.g. to refuse an unwritable directory in the
    function's own words before the lock file is created).
    """

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            directory = signature.bind(*args, **kwargs).arguments[argument]
            if check is not None:
                check(Path(directory))
            with lock_directory(directory):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def check_settings(record_path: str | os.PathLike, settings: dict, resuming: bool, fixed: tuple = ()) -> None:
    """Refuse to continue a job whose settings changed; record the settings of a new one.

    Parameters
    ----------
    record_path
        JSON file beside the output holding the settings of the run that wrote it.
    settings
        This run's settings (JSON-able).
    resuming
        Whether the job continues existing output (a checkpoint exists). A new job only records.
    fixed
        Keys compared on resume (default: all keys of ``settings``); other keys may change.

    Raises
    ------
    SettingsChangedError
        One line naming the output record, each changed setting with its old and new value, and
        what to do.
    """
    record_path = Path(record_path)
    if resuming and record_path.exists():
        try:
            saved = json.loads(record_path.read_text())
        except (OSError, ValueError):
            saved = None
            logger.warning("%s cannot be read; the settings of the run it describes are not checked", record_path)
        if isinstance(saved, dict):
            keys = fixed or tuple(settings)
            changed = [key for key in keys if key in saved and saved[key] != settings.get(key)]
            if changed:
                details = "; ".join(f"{key}: was {saved[key]!r}, now {settings.get(key)!r}" for key in changed)
                raise SettingsChangedError(
                    f"cannot continue the run recorded in {record_path}: its settings changed ({details}); "
                    "use the same settings, or delete the checkpoint to start again"
                )
    from .safe_files import write_atomically

    write_atomically(record_path, json.dumps(settings, indent=1, sort_keys=True) + "\n")
