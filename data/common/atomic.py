"""Atomic writes: a file or directory is either the old one or the complete new one, never half.
Also JSON Lines files: :func:`write_jsonl` (atomic) and :func:`read_jsonl`, its reader.

Files are written under a temporary name in the same directory (``.NAME.tmp-<pid>-<hex>``),
flushed and fsynced, renamed over the target with :func:`os.replace`, and the directory entry is
fsynced. Directories are built under a temporary name, fsynced file by file, and swapped in by
rename; a previous directory is kept under a side name (``.NAME.old-<pid>-<hex>``) until the new
one is in place, then removed. When the writing code raises, the temporary file or directory is
removed and the target is left exactly as it was.

Examples::

    write_json(run / "summary.json", summary)

    with atomic_file(path, "wb") as f:
        np.save(f, array)

    with atomic_path(run / "weights.safetensors") as tmp:   # for writers that want a file name
        save_file(tensors, str(tmp))

    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Union

__all__ = ["write_bytes", "write_text", "write_json", "write_jsonl", "read_jsonl", "atomic_file", "atomic_path",
           "atomic_dir", "publish_dir", "fsync_path", "fsync_tree", "temp_sibling", "remove_temporaries"]

PathLike = Union[str, "os.PathLike[str]"]
_TMP = ".tmp-"
_OLD = ".old-"


def temp_sibling(path: PathLike, tag: str = _TMP) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.tmp-<pid>-<hex>`` (unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: PathLike) -> None:
    """Flush a file or a directory entry to disk (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every file under ``path``, every directory under it, and ``path`` itself."""
    path = Path(path)
    for dirpath, _, names in os.walk(path, topdown=False):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_file(path: PathLike, mode: str = "w", encoding: str | None = None, newline: str | None = None
                ) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
        path: The file to (re)write; its directory must exist.
        mode: ``"w"`` (text, UTF-8 unless ``encoding``) or ``"wb"``.

    On an exception inside the block the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w', 'wt' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = temp_sibling(path)
    binary = "b" in mode
    f = open(tmp, "xb" if binary else "x", encoding=None if binary else (encoding or "utf-8"),
             newline=None if binary else newline)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        _remove(tmp)
        raise
    fsync_path(path.parent)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` for writers that take a name (safetensors, FAISS,
    ``torch.save``); on a clean exit the file written there is fsynced and replaces ``path``.

    On an exception (or when nothing was written) ``path`` is untouched and the temporary file removed.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temporary file for '{path}'")
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_path(path.parent)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json(path: PathLike, obj: Any, indent: int | None = 1, default=str, **dumps_kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (values JSON cannot hold go through ``default``,
    ``str`` unless given); returns ``Path(path)``."""
    return write_text(path, json.dumps(obj, indent=indent, default=default, **dumps_kwargs))


def write_jsonl(path: PathLike, records: Iterable[Any]) -> Path:
    """Write ``records`` as JSON Lines (one ``json.dumps(record)`` a line) to ``path`` atomically,
    creating its folder if needed; returns ``Path(path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: PathLike, bad_line: Callable[[int, json.JSONDecodeError], BaseException]
               ) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number from 1, value)`` for each non-blank line of the JSON Lines file ``path``.

    A line that is not JSON raises ``bad_line(line number, the JSONDecodeError)`` (without chaining).
    """
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise bad_line(n, exc) from None
            yield n, value


def publish_dir(tmp_dir: PathLike, final_dir: PathLike) -> Path:
    """Put the fully written directory ``tmp_dir`` in place of ``final_dir``.

    The files of ``tmp_dir`` are flushed to disk, then it is renamed to ``final_dir``. A previous
    ``final_dir`` is first renamed to a side name and removed only once the new directory is in
    place (if the second rename fails it is put back), so a crash at any point leaves a complete
    directory: the old one (possibly under its side name) or the new one. ``tmp_dir`` must be on
    the same filesystem as ``final_dir`` (a sibling, e.g. from :func:`temp_sibling`).
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    fsync_tree(tmp)
    if final.exists() or final.is_symlink():
        old = temp_sibling(final, _OLD)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        fsync_path(final.parent)
        _remove(old)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)
    return final


@contextmanager
def atomic_dir(final_dir: PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; on a clean exit it replaces ``final_dir``
    (see :func:`publish_dir`). The parent directory is created if needed.

    On an exception inside the block the temporary directory is removed and ``final_dir`` is left
    as it was.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def remove_temporaries(directory: PathLike) -> list[Path]:
    """Clean up after interrupted atomic writes in ``directory`` and return the paths removed.

    Temporary files and directories (``.NAME.tmp-*``) are removed. A kept previous directory
    (``.NAME.old-*``) is removed when ``NAME`` exists, and renamed back to ``NAME`` when it does
    not (a crash between the two renames of :func:`publish_dir`). Only for directories that one
    writer owns at a time.
    """
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        if not p.name.startswith("."):
            continue
        if _TMP in p.name:
            _remove(p)
            removed.append(p)
        elif _OLD in p.name:
            final = d / p.name[1:p.name.rindex(_OLD)]
            if final.exists() or final.is_symlink():
                _remove(p)
                removed.append(p)
            else:
                os.replace(p, final)
    return removed
