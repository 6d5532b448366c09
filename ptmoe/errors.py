"""One error path for the `ptmoe` command and the scripts: a user error is one line and exit code 2.

    ptmoe upcycle --base ./missing --out moe      →  ptmoe upcycle: error: --base './missing': no such folder …
    python scripts/train_mlm.py --train_file x.pdf →  train_mlm.py: error: --train_file 'x.pdf' has extension …

What counts as a user error (`USER_ERRORS`), and why:
- `ValueError` — the library's signal for bad input (invalid arguments, configs, data, checkpoints); its subclasses
  include `json.JSONDecodeError`, `UnicodeDecodeError` and transformers' own argument errors.
- `OSError` — files, folders and the network: `FileNotFoundError`, `FileExistsError`, `NotADirectoryError`,
  `IsADirectoryError`, `PermissionError`, a full disk, transformers' "not a valid model identifier" and Hub
  connection errors. None of these come from a bug in ptmoe's code.
- `UserError` — anything else the user has to fix (e.g. a missing optional dependency).

Everything else (`TypeError`, `AttributeError`, `KeyError`, `IndexError`, `RuntimeError`, `AssertionError`, …) is
a bug and keeps its traceback. Ask for the traceback of a user error too with `ptmoe --debug …` or the environment
variable `PTMOE_DEBUG=1` (the only switch for the scripts, whose `--debug` belongs to `TrainingArguments`).

Commands added to `ptmoe.cli` inherit this path by raising these exceptions; scripts end with
``if __name__ == "__main__": run_script(main)``. Library functions taking "a folder or a Hub id" call
`check_local_checkpoint` first, so a local path that does not exist is reported as a missing folder, not as an invalid
Hub repo id.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .models.moe import check_local_checkpoint  # re-exported: one definition, usable by the Hub code too

DEBUG_ENV = "PTMOE_DEBUG"


class UserError(Exception):
    """An error the user fixes (input, environment), reported as one line by the CLI and the scripts."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, UserError)


def debug_requested() -> bool:
    """True when `PTMOE_DEBUG` is set to a true value (1, true, yes, on)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def error_line(error: BaseException) -> str:
    """The message of `error` on one line (transformers' messages span several lines; an empty one shows the type)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def run_command(
    function: Callable[..., Any],
    *args: Any,
    prog: str,
    debug: bool = False,
    user_errors: tuple[type[BaseException], ...] = (),
    exit_on_sigterm: bool = False,
) -> int:
    """Call `function(*args)` and turn a user error into one line on stderr and exit code 2.

    Args:
        function (`Callable`): the command; an `int` result is its exit code, anything else means 0.
        *args: its arguments.
        prog (`str`): the prefix of the error line, e.g. ``"ptmoe upcycle"`` or ``"train_mlm.py"``.
        debug (`bool`, defaults to `False`): re-raise user errors with their traceback (also with `PTMOE_DEBUG=1`).
        user_errors (`tuple`, *optional*): more exception types that are user errors (e.g. `HubUploadError`).
        exit_on_sigterm (`bool`, defaults to `False`): turn SIGTERM into `SystemExit(143)` while `function` runs, so
            a killed command still removes its staging folder. Off for the Trainer scripts: under torchrun a rank
            blocked in a collective must stay killable by SIGTERM.

    Returns:
        The exit code: the command's own, 2 for a user error, 130 when interrupted (Ctrl-C).
    """
    debug = debug or debug_requested()
    previous = _exit_on_sigterm() if exit_on_sigterm else None
    try:
        result = function(*args)
    except (*USER_ERRORS, *user_errors) as error:
        if debug:
            raise
        print(f"{prog}: error: {error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _exit_on_sigterm():
    """Make SIGTERM (`kill`, job schedulers) raise `SystemExit(143)`, so `finally` blocks remove partial output.

    Python's default SIGTERM handling ends the process without unwinding, which would leave staging folders
    behind. Returns the previous handler (None outside the main thread, where handlers cannot be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def run_script(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> NoReturn:
    """The `__main__` of every script: `main(argv)` (default `sys.argv[1:]`) through `run_command`, then exit.

    The error line starts with the script's file name (``finetune_ner.py: error: …``). Tests call `main` directly
    and see the exception itself.
    """
    prog = Path(sys.argv[0]).name or getattr(main, "__module__", "script")
    sys.exit(run_command(main, sys.argv[1:] if argv is None else argv, prog=prog))


__all__ = [
    "DEBUG_ENV",
    "MissingDependencyError",
    "USER_ERRORS",
    "UserError",
    "check_local_checkpoint",
    "debug_requested",
    "error_line",
    "run_command",
    "run_script",
]
