"""Safe reading and writing of the package's ``torch.save`` files (networks, flows, checkpoints).

Every such file is a dict of plain content only — tensors, dicts, lists, tuples, numbers,
strings, ``None`` — plus a ``"sha256"`` entry: the SHA-256 digest of that content
(:func:`content_digest`). Reading (:func:`load_plain`) uses ``torch.load(weights_only=True)``, which
never runs code from the file, and then checks the digest, so a truncated or bit-flipped file is
refused as a whole instead of being half-read.

Files written before the digest existed are read without that check. A file whose content needs
unrestricted pickle (an object of a class, e.g. a NumPy scalar or anything planted by someone else)
is refused with a one-line error naming the file and how to regenerate it; loaders that offer it
take ``trust_pickle=True`` for files the user made themselves (see docs/reliability.md).

This module imports nothing else of the package, so ``flows/`` and ``forcefield/`` may both use it.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "DIGEST_KEY", "FileWriteError", "content_digest", "to_plain", "save_plain", "load_plain", "write_atomically",
]

logger = logging.getLogger(__name__)

DIGEST_KEY = "sha256"
"""Key of the content digest in every dict written by :func:`save_plain`."""

_LEAF_TYPES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _feed(digest: Any, value: Any) -> None:
    """Feed a canonical byte form of ``value`` to the hash ``digest`` (dict order does not matter)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(content: Any) -> str:
    """SHA-256 (hex) of the content of a plain dict, without its own ``"sha256"`` entry."""
    digest = hashlib.sha256()
    if isinstance(content, Mapping):
        content = {key: value for key, value in content.items() if key != DIGEST_KEY}
    _feed(digest, content)
    return digest.hexdigest()


def to_plain(value: Any, where: str = "content") -> Any:
    """``value`` with NumPy arrays as tensors, NumPy scalars and paths as Python values.

    Raises
    ------
    TypeError
        For any other object (it would need unrestricted pickle to be read back).
    """
    if isinstance(value, np.generic):  # before the leaf test: np.float64 is a float subclass
        return value.item()
    if isinstance(value, torch.Tensor) or type(value) in _LEAF_TYPES:
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{where} is a NumPy object array, which cannot be stored without pickle")
        return torch.from_numpy(np.array(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        items = {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        return type(value)(items) if _plain_mapping(value) else items
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be stored without pickle")


def _plain_mapping(value: Mapping) -> bool:
    """Mappings that ``torch.load(weights_only=True)`` reads back as they are (OrderedDict, Counter)."""
    return type(value) in (collections.OrderedDict, collections.Counter)


class FileWriteError(OSError):
    """A file could not be written (full disk, no permission, ...); the previous version is kept."""


def _write_temporary(temporary: Path, data: bytes) -> None:
    """Write ``data`` to ``temporary`` and force it to disk (the one place output bytes are written)."""
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_failure(path: Path, problem: OSError) -> str:
    """One line for a failed write of ``path``: a full disk is named as such."""
    if problem.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device" if problem.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"cannot write {path}: {reason}; the previous version of the file (if any) is kept, so free some "
                "space and run the same command again to continue")
    return f"cannot write {path}: {problem.strerror or problem}; the previous version of the file (if any) is kept"


def write_atomically(path: str | os.PathLike, data: bytes | str,
                     error: Callable[[str], Exception] = FileWriteError) -> Path:
    """Write ``data`` to ``path`` through ``<path>.tmp``, fsync and rename: never a half-written file.

    Raises
    ------
    Exception
        ``error(message)`` (default :class:`FileWriteError`) with one line naming the file, e.g.
        ``"cannot write <path>: no space left on device; ..."``; the temporary file is removed and
        an existing ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_temporary(temporary, data.encode() if isinstance(data, str) else bytes(data))
        os.replace(temporary, path)
    except OSError as problem:
        temporary.unlink(missing_ok=True)
        raise error(_write_failure(path, problem)) from None
    return path


def save_plain(content: dict, path: str | os.PathLike, error: Callable[[str], Exception]) -> Path:
    """Write ``content`` plus its digest atomically (temporary file, then rename) with ``torch.save``.

    The content is serialised in memory first and written with :func:`write_atomically`, so a full
    disk is reported as such (``torch.save`` to a file would say only "file write failed").

    Raises
    ------
    Exception
        ``error(message)`` when the content holds an object that needs pickle, or the file cannot be
        written (e.g. ``"cannot write <path>: no space left on device; ..."``).
    """
    path = Path(path)
    try:
        content = to_plain(dict(content))
    except TypeError as problem:
        raise error(f"cannot write {path}: {problem}") from None
    content[DIGEST_KEY] = content_digest(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return write_atomically(path, buffer.getvalue(), error)


def _first_sentence(problem: BaseException) -> str:
    text = " ".join(str(problem).split())
    return (text.split(". ")[0] or type(problem).__name__)[:160]


def _pickled_global(problem: BaseException) -> str | None:
    """The class or function a weights-only load refused, or ``None`` for any other failure."""
    if not isinstance(problem, pickle.UnpicklingError):
        return None
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(problem))
    return match.group(1) if match else None


def load_plain(
    path: str | os.PathLike,
    *,
    what: str,
    remedy: str,
    error: Callable[[str], Exception],
    map_location: Any = "cpu",
    trust_pickle: bool = False,
    pickle_hint: str = "",
) -> dict:
    """Read a dict written by :func:`save_plain` without running code from the file.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, for messages (e.g. ``"network file"``).
    remedy
        What to do, for messages (e.g. ``"re-run train-ff to regenerate it"``).
    error
        Exception class (or factory) raised with a one-line message naming the file.
    map_location
        Passed to ``torch.load``.
    trust_pickle
        Read a file whose content needs unrestricted pickle anyway (it can run code: only for
        files the user made themselves). Default: refuse it.
    pickle_hint
        Appended to the remedy when a file is refused for its pickled content (e.g. how to opt in).

    Raises
    ------
    Exception
        ``error(message)`` when the file is missing, truncated, corrupt (digest mismatch), not a
        dict, or holds pickled objects and ``trust_pickle`` is false.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as problem:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        content = _load_refused(path, problem, what, (remedy, pickle_hint), error, map_location, trust_pickle)
    if not isinstance(content, dict):
        raise error(f"{path}: not a {what} of openmm-flowmatch; {remedy}")
    stored = content.get(DIGEST_KEY)
    if stored is not None and stored != content_digest(content):
        raise error(
            f"{path}: this {what} is corrupt (its SHA-256 checksum does not match its content: bytes changed "
            f"on disk or in transfer); {remedy}"
        )
    if stored is None:
        logger.info("%s has no checksum (written by an older openmm-flowmatch); read without integrity check", path)
    return content


def _load_refused(path: Path, problem: BaseException, what: str, remedies: tuple[str, str],
                  error: Callable[[str], Exception], map_location: Any, trust_pickle: bool) -> Any:
    """Handle a failed weights-only load: unsafe pickle (refuse or, if trusted, load) or corruption."""
    remedy, pickle_hint = remedies
    name = _pickled_global(problem)
    if name is None:
        raise error(f"{path}: cannot read this {what}, it is truncated or corrupt ({_first_sentence(problem)}); {remedy}") from None
    if not trust_pickle:
        raise error(
            f"{path}: this {what} holds pickled Python objects ({name}), which can run code when loaded, so it "
            f"was not read (written by an older openmm-flowmatch, or not by openmm-flowmatch); {remedy}{pickle_hint}"
        ) from None
    logger.warning("%s: loading pickled content (%s) because trust_pickle=True; this can run code", path, name)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as again:  # noqa: BLE001
        raise error(f"{path}: cannot read this {what} ({_first_sentence(again)}); {remedy}") from None
