"""Publish ptmoe models on the Hugging Face Hub: prepare → verify → push.

Run from the repository root::

    python -m hub_upload prepare MODEL_DIR OUT_DIR [--card CARD.md] [--adapter DIR ...]
    python -m hub_upload verify OUT_DIR --source MODEL_DIR
    python -m hub_upload push OUT_DIR --repo-id ORG/NAME [--private] [--revision REV] [--no-dry-run]

`prepare` builds a folder that loads with `trust_remote_code=True` where ptmoe is not installed, and proves it
by loading it in a fresh process without ptmoe and comparing its outputs with the source model's. `push`
uploads only such a verified, unchanged folder.
"""

from .prepare import build_folder, prepare
from .push import push, upload_plan
from .verify import STAMP_NAME, HubUploadError, check_folder, check_verified, verify_folder

__all__ = [
    "STAMP_NAME",
    "HubUploadError",
    "build_folder",
    "check_folder",
    "check_verified",
    "prepare",
    "push",
    "upload_plan",
    "verify_folder",
]
