"""Upload a verified Hub-ready folder with `huggingface_hub` (`create_repo` + `upload_folder`).

`push` refuses a folder that was never verified or that changed after verification (`verify.check_verified`),
and by default only lists what it would upload (dry run). The token comes only from `HF_TOKEN` or the login
cache (`huggingface_hub.get_token()`); it is handed to `HfApi` and never printed, logged or written.
The verification stamp (`.ptmoe_verified.json`) is not uploaded: it records local paths and is only meaningful
for the local folder; the Hub keeps its own file hashes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .verify import STAMP_NAME, HubUploadError, check_verified

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:,.0f} {unit}" if unit == "B" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def upload_plan(out_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """`(relative path, size in bytes)` of every file `push` uploads (everything but the verification stamp)."""
    out = Path(out_dir)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return [(p.relative_to(out).as_posix(), p.stat().st_size) for p in files if p.name != STAMP_NAME]


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = True,
    api_factory: Callable[..., Any] | None = None,
    print_fn: Callable[[str], None] = print,
):
    r"""
    Upload a verified folder to the Hub model repository `repo_id`.

    Args:
        out_dir (`str` or `os.PathLike`): a folder made by `prepare` (verified, unchanged since).
        repo_id (`str`): `ORG/NAME`.
        private (`bool`, defaults to `False`): create the repository as private (an existing one is not changed).
        revision (`str`, *optional*): branch to commit to; created from `main` if it does not exist.
        commit_message (`str`, *optional*): defaults to "Upload <folder> (verified with ptmoe <version>)".
        dry_run (`bool`, defaults to `True`): only list the files and sizes; nothing is sent.
        api_factory (*optional*): builds the API client from `token=` (default `huggingface_hub.HfApi`); tests
            pass a recording stand-in.
        print_fn (*optional*): where the report goes (default `print`).

    Returns:
        `None` for a dry run, else the `CommitInfo` of `upload_folder`.

    Raises:
        HubUploadError: bad repo id, unverified or changed folder, no token, or a failed upload.
    """
    if not _REPO_ID.match(repo_id or ""):
        raise HubUploadError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    stamp = check_verified(out_dir)
    plan = upload_plan(out_dir)
    width = max(len(name) for name, _ in plan)
    print_fn(f"{'Dry run: would upload' if dry_run else 'Uploading'} {len(plan)} files to {repo_id}:")
    for name, size in plan:
        print_fn(f"  {name.ljust(width)}  {_size(size).rjust(10)}")
    print_fn(f"  {'total'.ljust(width)}  {_size(sum(size for _, size in plan)).rjust(10)}")
    verified = stamp.get("verified_at", "?")
    print_fn(
        f"Verified {verified} with ptmoe {stamp.get('versions', {}).get('ptmoe', '?')}; unchanged since."
    )
    if dry_run:
        visibility = "private" if private else "public"
        print_fn(
            f"Nothing was uploaded. Re-run with --no-dry-run to create or update the {visibility} repository "
            f"https://huggingface.co/{repo_id}" + (f" (branch {revision})" if revision else "") + "."
        )
        return None

    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise HubUploadError(
            "no Hugging Face token: set the HF_TOKEN environment variable or log in with `hf auth login`"
        )
    message = (
        commit_message
        or f"Upload {Path(out_dir).resolve().name} (verified with ptmoe {stamp['versions']['ptmoe']})"
    )
    try:
        api = (api_factory or HfApi)(token=token)
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(Path(out_dir)),
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=[STAMP_NAME],
        )
    except HubUploadError:
        raise
    except Exception as error:  # never let a token leak through an error message
        raise HubUploadError(f"upload to {repo_id} failed: {_redact(str(error), token)}") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    print_fn(f"Uploaded: {url}")
    return commit


__all__ = ["push", "upload_plan"]
