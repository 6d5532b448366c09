"""Output folders: nothing lost, nothing half-written.

    check_output_dir(out, overwrite)      refuse a file, or a non-empty folder unless `overwrite` (call it first,
                                          before any expensive work)
    with staged_output_dir(out, overwrite) as staging:
        ... write everything into `staging` (a hidden folder next to `out`) ...
                                          → on success `staging` becomes `out` (an old `out` is replaced only now);
                                            on any error `staging` is removed and `out` is left as it was

Every command that writes a folder (upcycle, convert-switch, demo, and the ones to come) goes through these two.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory unless `overwrite`.

    Args:
        out_dir (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`, defaults to `False`): a non-empty folder will be replaced (by `staged_output_dir`).

    Returns:
        The absolute output path.

    Raises:
        `FileExistsError` with what to do instead; `ValueError` when `overwrite` would replace the working
        directory, one of its parents or the home directory.
    """
    out = Path(os.path.abspath(out_dir))  # "." or "out/" need a real name and parent for the staging folder
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {str(out)!r} exists and is not empty; choose another directory or pass "
                "overwrite=True (`--overwrite` on the command line) to replace it"
            )
        # Replacing means deleting the old folder at the end: never the working directory, its parents or home.
        cwd, home = Path.cwd().resolve(), Path.home().resolve()
        resolved = out.resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == home or resolved in home.parents:
            raise ValueError(
                f"refusing to replace {str(out)!r}: it is the current directory, one of its parents or the home "
                "directory. Write into a new sub-folder instead (e.g. --output-dir ./outputs/run1)."
            )
    return out


@contextmanager
def staged_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write into a temporary folder next to `out_dir`; move it into place only when the block succeeds.

    With `overwrite`, an existing `out_dir` is replaced as a whole at the very end (renamed aside, then deleted
    once the new folder is in place; restored if the final rename fails). On any exception, including Ctrl-C,
    the temporary folder is deleted and `out_dir` is untouched.

    Args:
        out_dir (`str` or `os.PathLike`): the destination folder (checked with `check_output_dir`).
        overwrite (`bool`, defaults to `False`): replace a non-empty `out_dir`.

    Yields:
        The staging folder (`Path`), empty.
    """
    out = check_output_dir(out_dir, overwrite)
    created = next((p for p in reversed(out.parents) if not p.exists()), None)  # outermost missing parent
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        check_output_dir(out, overwrite)  # the folder may have been filled meanwhile
        if out.exists():
            backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            os.rename(out, backup)
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(backup, out)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not any(p.is_file() for p in created.rglob("*")):  # parents made for `out`
            shutil.rmtree(created, ignore_errors=True)
        raise


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parent folders created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["check_output_dir", "save_figure", "staged_output_dir"]
