"""Verify a Hub-ready folder: static checks, then a load-and-compare run in a fresh process without ptmoe.

`verify_folder(out_dir, source_dir)`:

1. static checks (`check_folder`): no pickle files; `config.json` with an `auto_map` whose every target module is
   in the folder and defines the named class; every relative import of that code resolvable inside the folder
   and no import of ptmoe; safetensors weights (all shards of an index); a README.md whose metadata parses;
   adapters made of `adapter_config.json` + safetensors;
2. the source model is loaded in this process with ptmoe and run on a fixed batch (`remote_check.fixed_inputs`);
3. `remote_check.py` runs in a fresh `python` with `sys.modules["ptmoe"] = None`, `HF_MODULES_CACHE` and the
   working directory in a temporary folder: it loads the folder with the right Auto class and
   `trust_remote_code=True`, runs the same batch and writes every output tensor to a safetensors file;
4. every weight of the loaded model must be bit-identical to the source's (sha256 per tensor: this also catches
   edits that the fixed batch would not reach), and every output must match the source's within `atol` (1e-5);
5. on success `.ptmoe_verified.json` records the sha256 of every file and the versions used. `push` refuses a
   folder without it or whose files changed since (`check_verified`).
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import remote_check

STAMP_NAME = ".ptmoe_verified.json"
# Formats that unpickle on load (and so can run code): never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTERS_DIR = "adapters"
DEFAULT_ATOL = 1e-5


class HubUploadError(Exception):
    """A folder cannot be prepared, verified or pushed. The message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in `folder` (recursively) by relative POSIX path, the verification stamp excepted."""
    folder = Path(folder)
    hashes = {}
    for path in _files(folder):
        relative = path.relative_to(folder).as_posix()
        if relative == STAMP_NAME:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[relative] = digest.hexdigest()
    return hashes


def find_pickles(folder: str | os.PathLike) -> list[str]:
    """Relative paths of the pickle-format files (`PICKLE_SUFFIXES`) in `folder`, recursively."""
    folder = Path(folder)
    return [p.relative_to(folder).as_posix() for p in _files(folder) if p.suffix.lower() in PICKLE_SUFFIXES]


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors weight files of a model folder (top level), checked against a sharded index if present.

    Raises:
        HubUploadError: no safetensors weights, or shards named by the index are missing.
    """
    folder = Path(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        listed = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in listed if name not in shards]
        if missing:
            raise HubUploadError(f"{folder}: shards listed in {WEIGHTS_INDEX} are missing: {missing}")
    if not shards:
        raise HubUploadError(
            f"{folder} has no safetensors weights (*.safetensors). Save the model with "
            "`model.save_pretrained(folder)`, which writes model.safetensors."
        )
    return shards


# --------------------------------------------------------------------------------------------------------------
# Code shipped with the weights
# --------------------------------------------------------------------------------------------------------------
def auto_map_targets(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """`{auto class: (module, class)}` from a config's `auto_map`.

    Raises:
        HubUploadError: no `auto_map`, or a target that points at another repository (`repo--module.Class`).
    """
    auto_map = config.get("auto_map")
    if not auto_map:
        raise HubUploadError(
            "config.json has no `auto_map`: without it `trust_remote_code=True` cannot find the model code. "
            "Save the model with ptmoe (its configs write `auto_map`) or let `prepare` add it."
        )
    targets = {}
    for auto_class, reference in auto_map.items():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if not isinstance(reference, str) or "--" in reference or reference.count(".") != 1:
            raise HubUploadError(
                f"auto_map[{auto_class!r}] = {reference!r}: expected 'module.Class' naming a file of this folder"
            )
        module, class_name = reference.split(".")
        targets[auto_class] = (module, class_name)
    return targets


def _imports(source: str, path: str) -> tuple[set[str], set[str], list[str]]:
    """(relative sibling modules, top-level classes, problems) of one Python source file."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as error:
        return set(), set(), [f"{path} does not parse: {error}"]
    siblings, problems = set(), []
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                siblings.add(node.module.split(".")[0])
            elif node.level == 1:
                siblings.update(alias.name for alias in node.names)
            elif node.level > 1:
                problems.append(
                    f"{path} imports from a parent package (level {node.level}), which a Hub folder lacks"
                )
            elif node.module and node.module.split(".")[0] == "ptmoe":
                problems.append(f"{path} imports ptmoe, which is not installed where the folder is loaded")
        elif isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] == "ptmoe" for alias in node.names):
                problems.append(f"{path} imports ptmoe, which is not installed where the folder is loaded")
    return siblings, classes, problems


def code_files(folder: str | os.PathLike, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The `.py` files the folder's `auto_map` needs (targets and their relative imports), and the problems.

    Args:
        folder: where to look for the files.
        config (`dict`): the folder's `config.json`.

    Returns:
        `(files, problems)`: the file names needed (found or not) and what is wrong with them.
    """
    folder = Path(folder)
    targets = auto_map_targets(config)
    needed_classes: dict[str, set[str]] = {}
    for module, class_name in targets.values():
        needed_classes.setdefault(module, set()).add(class_name)
    queue, seen, problems = list(needed_classes), set(), []
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            users = [auto for auto, (m, _) in targets.items() if m == module]
            why = f"named by auto_map {users}" if users else "imported by the model code"
            problems.append(f"{module}.py is missing ({why})")
            continue
        siblings, classes, file_problems = _imports(path.read_text(), path.name)
        problems += file_problems
        missing_classes = sorted(needed_classes.get(module, set()) - classes)
        if missing_classes:
            problems.append(f"{module}.py does not define {missing_classes} named by auto_map")
        queue.extend(siblings - seen)
    return sorted(f"{module}.py" for module in seen), problems


# --------------------------------------------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------------------------------------------
def check_folder(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Static checks of a Hub-ready folder (see the module docstring); returns its `config.json` as a dict.

    Raises:
        HubUploadError: listing every problem found.
    """
    from huggingface_hub import ModelCard

    out = Path(out_dir)
    if not out.is_dir():
        raise HubUploadError(f"{out} is not a directory")
    problems = []
    pickles = find_pickles(out)
    if pickles:
        problems.append(
            f"pickle files {pickles} (they can run code when loaded; only safetensors are published — delete them)"
        )
    config_path = out / "config.json"
    if not config_path.is_file():
        raise HubUploadError(f"{out} has no config.json")
    config = json.loads(config_path.read_text())
    try:
        _, code_problems = code_files(out, config)
        problems += code_problems
    except HubUploadError as error:
        problems.append(str(error))
    try:
        weight_files(out)
    except HubUploadError as error:
        problems.append(str(error))
    readme = out / "README.md"
    if not readme.is_file():
        problems.append("README.md (the model card) is missing")
    else:
        try:
            ModelCard(readme.read_text())
        except Exception as error:
            problems.append(f"README.md metadata does not parse: {error}")
    for adapter in adapter_dirs(out):
        if (
            not (adapter / "adapter_config.json").is_file()
            or not (adapter / "adapter_model.safetensors").is_file()
        ):
            problems.append(
                f"{adapter.relative_to(out)} needs adapter_config.json and adapter_model.safetensors"
            )
    if problems:
        raise HubUploadError(f"{out} failed verification:\n  - " + "\n  - ".join(problems))
    return config


def adapter_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The adapter folders of a Hub-ready folder (`adapters/<name>/`)."""
    root = Path(out_dir) / ADAPTERS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def auto_class_for(config: dict[str, Any]) -> str:
    """The Auto class that loads the folder's own architecture (`architectures[0]`), from its `auto_map`."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise HubUploadError(
            "config.json has no `architectures`: cannot tell which Auto class loads the model"
        )
    for auto_class, (_, class_name) in auto_map_targets(config).items():
        if class_name == architectures[0] and auto_class != "AutoConfig":
            return auto_class
    raise HubUploadError(f"auto_map has no Auto class for the architecture {architectures[0]!r}")


# --------------------------------------------------------------------------------------------------------------
# Load-and-compare
# --------------------------------------------------------------------------------------------------------------
def load_source_model(source_dir: str | os.PathLike, architecture: str):
    """Load the source folder with ptmoe, in this process (the reference the Hub folder must reproduce)."""
    import ptmoe

    model_class = getattr(ptmoe, architecture, None)
    if model_class is None:
        raise HubUploadError(f"ptmoe has no class {architecture!r} (from config.json `architectures`)")
    return model_class.from_pretrained(source_dir).eval()


def run_without_ptmoe(
    out_dir: Path,
    auto_class: str,
    inputs_path: Path,
    outputs_path: Path,
    adapters: list[Path],
    workdir: Path,
    timeout: int,
) -> subprocess.CompletedProcess:
    """Run `remote_check.py` on `out_dir` in a fresh interpreter where `import ptmoe` fails."""
    script = (
        "import runpy, sys\n"
        "sys.modules['ptmoe'] = None  # ptmoe is not importable here, as on a machine without it\n"
        f"sys.argv = [{remote_check.__file__!r}] + {[str(out_dir), auto_class, str(inputs_path), str(outputs_path)] + [str(a) for a in adapters]!r}\n"
        f"runpy.run_path({remote_check.__file__!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # nothing but the installed packages (ptmoe blocked) may be importable
    try:
        return subprocess.run(
            [sys.executable, "-c", script],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise HubUploadError(f"loading {out_dir} without ptmoe did not finish within {timeout} s") from None


def compare_weights(expected: dict[str, str], actual: dict[str, str]) -> None:
    """Raise `HubUploadError` naming the weights whose digests (`remote_check.state_digests`) differ."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(name for name in set(expected) & set(actual) if expected[name] != actual[name])
    if missing or extra or changed:
        details = "; ".join(
            f"{what}: {names[:6]}{' …' if len(names) > 6 else ''}"
            for what, names in (
                ("changed", changed),
                ("only in the source", missing),
                ("only in the folder", extra),
            )
            if names
        )
        raise HubUploadError(
            f"the folder's weights, loaded without ptmoe, differ from the source model's ({details}); the folder "
            "does not reproduce the source model"
        )


def compare_weight_files(out_dir: Path, source) -> None:
    """Fast pre-check, before the fresh process: the tensors in the folder's safetensors files must equal the
    source model's (tensor by tensor, so the folder is never loaded whole). Raise `HubUploadError` naming them.

    Keys the source model does not have, or tensors stored in another dtype, are left to the fresh-process check.
    """
    from safetensors import safe_open

    state = source.state_dict()
    changed = []
    for file_name in weight_files(out_dir):
        with safe_open(out_dir / file_name, framework="pt") as handle:
            for key in handle.keys():
                expected = state.get(key)
                if expected is None:
                    continue
                tensor = handle.get_tensor(key)
                if tensor.dtype == expected.dtype and not torch.equal(tensor, expected.detach().cpu()):
                    changed.append(key)
    if changed:
        shown = f"{changed[:6]}{' …' if len(changed) > 6 else ''}"
        raise HubUploadError(
            f"the folder's weight files differ from the source model's (changed: {shown}); the folder does not "
            "reproduce the source model"
        )


def compare_outputs(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], atol: float
) -> dict[str, float]:
    """Max absolute difference per output; raise `HubUploadError` naming the outputs that differ.

    Args:
        expected (`dict[str, Tensor]`): outputs of the source model (with ptmoe).
        actual (`dict[str, Tensor]`): outputs of the Hub folder (without ptmoe).
        atol (`float`): largest accepted absolute difference.
    """
    problems, differences = [], {}
    if set(expected) != set(actual):
        problems.append(
            f"different outputs: only from the source {sorted(set(expected) - set(actual))}, only from the "
            f"folder {sorted(set(actual) - set(expected))}"
        )
    for name in sorted(set(expected) & set(actual)):
        if expected[name].shape != actual[name].shape:
            problems.append(f"{name}: shape {tuple(actual[name].shape)} != {tuple(expected[name].shape)}")
            continue
        difference = (
            (expected[name].double() - actual[name].double()).abs().max().item()
            if expected[name].numel()
            else 0.0
        )
        differences[name] = difference
        if not difference <= atol:  # also catches NaN
            problems.append(f"{name}: max abs difference {difference:.3g} > {atol:g}")
    if problems:
        raise HubUploadError(
            "the folder, loaded without ptmoe, does not reproduce the source model:\n  - "
            + "\n  - ".join(problems)
        )
    return differences


def verify_folder(
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    *,
    atol: float = DEFAULT_ATOL,
    timeout: int = 900,
) -> dict[str, Any]:
    r"""
    Verify a Hub-ready folder against the model folder it was built from, and stamp it.

    Args:
        out_dir (`str` or `os.PathLike`): the Hub-ready folder (from `prepare`).
        source_dir (`str` or `os.PathLike`): the trained model folder it was built from.
        atol (`float`, defaults to 1e-5): largest accepted absolute difference of any output.
        timeout (`int`, defaults to 900): seconds allowed for the fresh-process check.

    Returns:
        The stamp written to `out_dir/.ptmoe_verified.json`.

    Raises:
        HubUploadError: with every problem found (static checks, load failure, output mismatch).
    """
    import transformers
    from safetensors.torch import load_file, save_file

    import ptmoe

    out = Path(out_dir).resolve()
    (out / STAMP_NAME).unlink(missing_ok=True)  # a folder being re-verified is unverified until it passes
    config = check_folder(out)
    auto_class = auto_class_for(config)
    architecture = config["architectures"][0]
    adapters = adapter_dirs(out)

    source = load_source_model(source_dir, architecture)
    compare_weight_files(out, source)
    inputs = remote_check.fixed_inputs(source)
    expected = remote_check.run_model(source, inputs)
    if adapters:
        from peft import PeftModel

        for adapter in adapters:
            adapted = PeftModel.from_pretrained(load_source_model(source_dir, architecture), str(adapter))
            for key, value in remote_check.run_model(adapted, inputs).items():
                expected[f"{remote_check.adapter_prefix(str(adapter))}.{key}"] = value

    with tempfile.TemporaryDirectory(prefix="ptmoe-verify-") as tmp:
        workdir = Path(tmp)
        inputs_path, outputs_path = workdir / "inputs.safetensors", workdir / "outputs.safetensors"
        save_file(inputs, inputs_path)
        result = run_without_ptmoe(out, auto_class, inputs_path, outputs_path, adapters, workdir, timeout)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise HubUploadError(
                f"loading {out} with {auto_class}.from_pretrained(..., trust_remote_code=True) in a fresh process "
                f"without ptmoe failed:\n{tail}"
            )
        actual = load_file(outputs_path)
        folder_digests = json.loads(Path(f"{outputs_path}.digests.json").read_text())
    compare_weights(remote_check.state_digests(source), folder_digests)
    differences = compare_outputs(expected, actual, atol)

    stamp = {
        "verified_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(Path(source_dir).resolve()),
        "architecture": architecture,
        "auto_class": auto_class,
        "adapters": [a.name for a in adapters],
        "atol": atol,
        "max_abs_difference": max(differences.values(), default=0.0),
        "outputs_compared": len(differences),
        "versions": {
            "ptmoe": ptmoe.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "files": file_hashes(out),
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def check_verified(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The stamp of a verified folder whose files have not changed since verification.

    Raises:
        HubUploadError: no stamp (never verified), or files changed, added or removed since.
    """
    out = Path(out_dir)
    stamp_path = out / STAMP_NAME
    if not stamp_path.is_file():
        raise HubUploadError(
            f"{out} is not verified (no {STAMP_NAME}). Build it with `python -m hub_upload prepare MODEL_DIR "
            f"{out}`, or check it with `python -m hub_upload verify {out} --source MODEL_DIR`."
        )
    try:
        recorded = json.loads(stamp_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise HubUploadError(
            f"{stamp_path} is not a valid verification stamp; verify the folder again"
        ) from None
    current = file_hashes(out)
    changed = sorted(name for name in set(recorded) & set(current) if recorded[name] != current[name])
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    if changed or added or removed:
        details = "; ".join(
            f"{what}: {names}"
            for what, names in (("changed", changed), ("added", added), ("removed", removed))
            if names
        )
        raise HubUploadError(
            f"{out} changed after it was verified ({details}). Verify it again with `python -m hub_upload verify "
            f"{out} --source MODEL_DIR` before pushing."
        )
    return json.loads(stamp_path.read_text())
