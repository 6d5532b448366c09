"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`), for the installed transformers version.

Those tests are not in the transformers wheel, but its source distribution on PyPI holds `tests/*.py`. They are
never copied into this repository: `load_common_tests()` finds them in a cache folder
(``$PTMOE_TRANSFORMERS_TESTS_CACHE``, default ``~/.cache/ptmoe/transformers-tests/<version>/tests``) and, on the
first run, fetches the sdist with pip (``pip download --no-deps --no-binary :all: transformers==<version>``) and
extracts only its top-level ``tests/*.py`` there.

Offline without a cached copy the tests cannot run: `load_common_tests` then raises `CommonTestsUnavailable`,
which the test module turns into one skip with the reason, except under ``CI=true`` where it is a failure (CI must
run them). The sdist leaves out three sub-packages the common tests import (``tests/exporters``,
``tests/generation``, ``tests/utils``); `load_common_tests` stands in empty mixins and a small argument list for
them (`ABSENT_FROM_SDIST`), so their tests (torch.export, the `GenerationTesterMixin` suite) do not run.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

CACHE_ENV = "PTMOE_TRANSFORMERS_TESTS_CACHE"
# The name the extracted `tests/` folder is imported under (its modules import each other relatively).
PACKAGE = "transformers_sdist_tests"

# Modules the common tests import that the sdist does not ship, and our stand-ins for the names they import.
# The mixins are empty: the tests they hold are not in the sdist, so none of them runs.
ABSENT_FROM_SDIST = {
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    # `ConfigTester.check_config_arguments_init` sets these `PreTrainedConfig` arguments to non-default values and
    # checks that the config keeps them (our own choice of arguments, as transformers' list is not shipped).
    "utils.test_configuration_utils": {
        "config_common_kwargs": {
            "return_dict": False,
            "output_hidden_states": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "problem_type": "regression",
            "pad_token_id": 3,
            "bos_token_id": 4,
            "eos_token_id": 5,
        }
    },
}


class CommonTestsUnavailable(RuntimeError):
    """transformers' common tests are neither cached nor downloadable (e.g. offline); the message says why."""


def in_ci() -> bool:
    """True under CI (`CI=true`, as set by GitHub Actions, GitLab and most CI services)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def cache_dir(version: str = transformers.__version__) -> Path:
    """The folder that holds (or will hold) the `tests/` of transformers `version`'s sdist."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptmoe" / "transformers-tests"
    return Path(root) / version


def _download_tests(version: str, target: Path) -> None:
    """Fetch transformers `version`'s sdist with pip and extract its top-level `tests/*.py` into `target`."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--disable-pip-version-check", "-q", "-d", download, f"transformers=={version}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CommonTestsUnavailable(f"`{' '.join(command)}` failed: {error}") from error
        archives = sorted(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise CommonTestsUnavailable(f"`{' '.join(command)}` failed: {last}")
        # Extract into a staging folder and rename it into place, so a half-written cache is never used.
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tests-"))
        try:
            with tarfile.open(archives[0]) as archive:
                for member in archive.getmembers():
                    parts = Path(member.name).parts  # transformers-<version>/tests/<name>.py
                    if (
                        len(parts) == 3
                        and parts[1] == "tests"
                        and member.isfile()
                        and parts[2].endswith(".py")
                    ):
                        data = archive.extractfile(member)
                        (staging / parts[2]).write_bytes(data.read())
            # `test_configuration_common` runs `direct_transformers_import(<its folder>)`, which executes the
            # folder's `__init__.py` (empty in transformers' repository, absent from the sdist).
            (staging / "__init__.py").touch()
            if not (staging / "test_modeling_common.py").is_file():
                raise CommonTestsUnavailable(f"{archives[0].name} holds no tests/test_modeling_common.py")
            try:
                staging.rename(target)
            except OSError:  # another process put it there first
                if not (target / "test_modeling_common.py").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def tests_folder(version: str = transformers.__version__) -> Path:
    """The cached `tests/` folder of transformers `version`'s sdist, downloaded on first use.

    Raises:
        `CommonTestsUnavailable`: not cached and the download failed (the message says how).
    """
    target = cache_dir(version) / "tests"
    if not (target / "test_modeling_common.py").is_file() or not (target / "__init__.py").is_file():
        shutil.rmtree(target, ignore_errors=True)  # absent, or left by an older layout of this cache
        _download_tests(version, target)
    return target


def _register_package(folder: Path) -> None:
    """Make `folder` importable as `PACKAGE`, with empty stand-ins for the sub-modules the sdist leaves out."""
    if PACKAGE in sys.modules:
        return
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    for module_name, names in ABSENT_FROM_SDIST.items():
        if (folder / (module_name.replace(".", "/") + ".py")).is_file():
            continue
        parent_name, _ = module_name.split(".")
        parent = sys.modules.setdefault(
            f"{PACKAGE}.{parent_name}", types.ModuleType(f"{PACKAGE}.{parent_name}")
        )
        parent.__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{module_name}")
        module.__dict__.update(names)
        sys.modules[module.__name__] = module


def load_common_tests() -> types.SimpleNamespace:
    """Import transformers' `ModelTesterMixin`, `ConfigTester` and helpers for the installed version.

    Returns:
        A namespace with `ModelTesterMixin`, `ConfigTester`, `ids_tensor`, `random_attention_mask`, `global_rng`
        (the `random.Random` those two draw from), `GenerationTesterMixin` (an empty stand-in when the sdist lacks
        it) and `folder` (where the tests are).

    Raises:
        `CommonTestsUnavailable`: see `tests_folder`.
    """
    folder = tests_folder()
    _register_package(folder)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    generation = importlib.import_module(f"{PACKAGE}.generation.test_utils")
    return types.SimpleNamespace(
        ModelTesterMixin=modeling.ModelTesterMixin,
        ConfigTester=configuration.ConfigTester,
        GenerationTesterMixin=generation.GenerationTesterMixin,
        ids_tensor=modeling.ids_tensor,
        random_attention_mask=modeling.random_attention_mask,
        global_rng=modeling.global_rng,
        folder=folder,
    )
