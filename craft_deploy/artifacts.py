"""Atomic files and output directories: a killed or failed run never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from craft_deploy import CraftError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """Parse the JSON file `path` (described as `what` in errors): missing and corrupt files are CraftErrors."""
    path = Path(path)
    if not path.is_file():
        raise CraftError(f"{what} {path} does not exist{missing_hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CraftError(f"{what} {path} is corrupt (not JSON: {e})") from e


def check_out_dir(out: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an existing non-empty `out` unless `overwrite`, and an `out` that is, or lies inside, one of the stage's
    `inputs` (a bundle, an export directory), or that holds one (--overwrite would delete it); create nothing yet."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            where = "the same path as"
        elif source.is_dir() and source in target.parents:
            where = "inside"
        elif target in source.parents:
            where = "a directory holding"
        else:
            continue
        raise CraftError(
            f"--out {out} is {where} the input {given}: a stage never writes into what it reads; give a path outside it"
        )
    if out.exists() and not out.is_dir():
        raise CraftError(f"--out {out} exists and is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CraftError(f"--out {out} exists and is not empty; choose another path or pass --overwrite")
    return out


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a resumable stage writing to `out` keeps its work until it completes: a hidden sibling of `out`."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False, resumable: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `out`; on success it replaces `out`.

    On failure the staging directory is removed, unless `resumable`: then it is `partial_dir(out)` and is kept when it
    holds anything, so a killed or interrupted run can be continued from what it wrote there. Either way `out` only
    ever holds a complete result.
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        stage = partial_dir(out)
        stage.mkdir(exist_ok=True)
    else:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
    except BaseException:
        if not resumable or not any(stage.iterdir()):  # keep a resumable stage only if it holds work to resume
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)
