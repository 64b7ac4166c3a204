"""A model repository: `REPO/NAME/VERSION/`, VERSION a positive integer, each a model directory.

A server polls the repository, so a version appears whole or not at all: `publish` writes it
into a hidden temp directory beside the versions, syncs it, and renames it into place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from lstm_model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model
from lstm_model.config import LSTMConfig

MAX_ATTEMPTS = 100  # versions taken by other publishers in a row before giving up
_NOREPLACE = 1  # renameat2's RENAME_NOREPLACE
_AT_FDCWD = -100


class PublishError(Exception):
    """A version that cannot be added to a repository; the message says why."""


def version_number(name: str) -> int | None:
    """The version a directory name stands for: a positive integer written without leading
    zeros (so no two names stand for one version), else None."""
    if not (name.isascii() and name.isdigit()) or name.startswith("0"):
        return None
    return int(name)


def identity_from_path(out: Path) -> tuple[str, str] | None:
    """(name, version) when `out` is REPO/NAME/VERSION, a repository's version directory."""
    version = version_number(out.name)
    name = out.resolve().parent.name
    if version is None or not name:
        return None
    return name, str(version)


def versions(model_dir: Path) -> list[int]:
    """The version numbers under a repository's REPO/NAME, ascending."""
    if not model_dir.is_dir():
        return []
    found = (version_number(p.name) for p in model_dir.iterdir() if p.is_dir())
    return sorted(v for v in found if v is not None)


def check_name(name: str) -> str:
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        raise PublishError(
            f"model name {name!r}: expected a plain directory name (not empty, no '/', not "
            f"starting with '.')"
        )
    return name


def publish(source: Path, repository: Path, name: str = "") -> tuple[Path, int]:
    """Add the model directory `source` to `repository` as the next version of `name` (default:
    its config's name); (the new version's directory, its number)."""
    loaded = load_model(source)  # ModelLoadError naming what is wrong; nothing written yet
    name = check_name(name or loaded.model.config.name)
    model_dir = repository / name
    staging = model_dir / f".publish-{secrets.token_hex(8)}"  # hidden: not a version
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise PublishError(f"{staging}: cannot create: {exc.strerror}") from None
    try:
        return _move_into_place(loaded.model.config, source, staging, model_dir)
    except OSError as exc:
        raise PublishError(f"{model_dir}: cannot write the new version: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a rename


def _move_into_place(
    config: LSTMConfig, source: Path, staging: Path, model_dir: Path
) -> tuple[Path, int]:
    _copy_synced(source / WEIGHTS_FILE, staging / WEIGHTS_FILE)
    number = max(versions(model_dir), default=0) + 1
    for _ in range(MAX_ATTEMPTS):
        identity = dataclasses.replace(config, name=model_dir.name, version=str(number))
        _write_synced(staging / CONFIG_FILE, identity.to_json().encode())
        _fsync_dir(staging)
        target = model_dir / str(number)
        try:
            rename_no_replace(staging, target)
        except FileExistsError:  # another publisher took this number meanwhile
            number = max([number, *versions(model_dir)]) + 1
            continue
        _fsync_dir(model_dir)
        return target, number
    raise PublishError(f"{model_dir}: gave up after {MAX_ATTEMPTS} versions taken meanwhile")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_synced(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename a directory; FileExistsError when `target` exists, even as an empty directory
    (which a plain rename would silently replace). Linux renameat2(RENAME_NOREPLACE) where the
    filesystem has it, else a check just before the rename."""
    if _renameat2(source, target):
        return
    if target.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # it appeared meanwhile, not empty
            raise FileExistsError(exc.errno, exc.strerror, str(target)) from None
        raise


@functools.cache
def _libc_renameat2() -> Any:
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _renameat2(source: Path, target: Path) -> bool:
    """Whether renameat2 did the rename; False where the system or filesystem lacks it."""
    call = _libc_renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    error = FileExistsError if code == errno.EEXIST else OSError
    raise error(code, os.strerror(code), str(target))
