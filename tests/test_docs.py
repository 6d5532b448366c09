"""The documentation is tested like code: README.md and docs/*.md.

- Every fenced ```python and ```bash block runs, offline, unless the line just before it is
  `<!-- doc-test: skip (REASON) -->`. The blocks of one page run in order, in one namespace and one temporary working
  folder, as a reader would type them. `<!-- doc-test: setup NAME[, NAME] -->` asks for names or files the block
  assumes (`SETUPS` below).
- Hub ids the examples use (BERTimbau, PTT5, google/switch-base-8) resolve to tiny stand-in models placed in a
  temporary Hub cache, so the examples keep the ids users type and still run in seconds without the network.
- `ptmoe ...` lines of a bash block run in this process through `ptmoe.cli.main` (a fresh interpreter per line would
  cost seconds of imports); any other bash line runs in `bash`.
- Every relative link and `#anchor` points to an existing file and heading; the README stays within 350 lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# Every page of docs/ (one level: the pages link each other by file name).
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(skip|setup)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a documentation page."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None = None  # the reason, when the block is marked to be skipped
    setups: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of `path` with the doc-test marker on the line before each (blank lines not allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and not FENCE.match(lines[index]):
            index += 1
        block = Block(path, start + 1, opening.group(1), "\n".join(lines[start + 1 : index]) + "\n")
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        if marker and marker.group(1) == "skip":
            reason = re.fullmatch(r"\((.+)\)", marker.group(2))
            assert reason, f"{block.where}: write the reason: <!-- doc-test: skip (REASON) -->"
            block.skip = reason.group(1)
        elif marker:
            block.setups = [name.strip() for name in marker.group(2).split(",") if name.strip()]
        blocks.append(block)
        index += 1  # past the closing fence
    return blocks


# --- tiny stand-ins for the Hub checkpoints the examples name --------------------------------------------------------

WORDS = (
    "o a de que e do da em um para é com não uma os no se na por mais as dos como mas foi ao ele das tem à seu sua ou "
    "ser quando muito há nos já está eu também só pelo pela até isso ela entre era depois sem mesmo aos ter seus quem "
    "nas me esse eles estão você tinha foram essa num nem suas meu às minha têm numa pelos elas havia seja qual será "
    "nós tenho lhe deles essas esses pelas este fosse dele lei juiz contrato notícia governo saúde médico"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TINY_T5 = dict(
    vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
)


def save_tiny_bert(folder: Path, seed: int = 0) -> None:
    """A tiny BERT masked LM with a WordPiece tokenizer over Portuguese words (stands in for BERTimbau)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=False).save_pretrained(
        folder
    )


def save_tiny_t5(folder: Path) -> None:
    """A tiny T5 (stands in for PTT5; no tokenizer, which upcycling reports and tolerates)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**TINY_T5)).save_pretrained(folder)


def save_tiny_switch(folder: Path) -> None:
    """A tiny transformers SwitchTransformers model (stands in for google/switch-base-8)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    config = SwitchTransformersConfig(
        **TINY_T5,
        num_decoder_layers=2,
        num_experts=8,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
    )
    SwitchTransformersForConditionalGeneration(config).save_pretrained(folder)


STAND_INS: dict[str, Callable[[Path], None]] = {
    "neuralmind/bert-base-portuguese-cased": save_tiny_bert,
    "unicamp-dl/ptt5-base-portuguese-vocab": save_tiny_t5,
    "google/switch-base-8": save_tiny_switch,
}


def place_in_hub_cache(cache: Path, repo_id: str, save: Callable[[Path], None]) -> None:
    """Write a model where huggingface_hub's offline mode looks for a downloaded `repo_id` (refs/main → snapshot)."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    for repo_id, save in STAND_INS.items():
        place_in_hub_cache(cache, repo_id, save)
    return cache


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, hub_cache) -> Path:
    """`bertimbau-moe-8x` as the upcycling page makes it, from the BERTimbau stand-in."""
    import ptmoe

    folder = tmp_path_factory.mktemp("moe") / "bertimbau-moe-8x"
    source = hub_cache / "models--neuralmind--bert-base-portuguese-cased" / "snapshots" / ("0" * 40)
    ptmoe.save_upcycled(
        ptmoe.upcycle(source, num_experts=8, num_experts_per_tok=2, moe_layers=2, seed=0), folder
    )
    return folder


# --- what a block may assume -----------------------------------------------------------------------------------------


def _bert_batch(namespace: dict, workdir: Path, fixtures) -> None:
    namespace["input_ids"] = torch.randint(5, 99, (2, 8))
    namespace["attention_mask"] = torch.ones(2, 8, dtype=torch.long)
    namespace["labels"] = torch.tensor([0, 1])


def _t5_batch(namespace: dict, workdir: Path, fixtures) -> None:
    namespace["ids"] = torch.randint(1, 99, (2, 8))
    namespace["mask"] = torch.ones(2, 8, dtype=torch.long)
    namespace["labels"] = torch.randint(1, 99, (2, 5))


def _moe_folder(namespace: dict, workdir: Path, fixtures) -> None:
    if not (workdir / "bertimbau-moe-8x").exists():  # a later block of the page may ask again
        shutil.copytree(fixtures["moe_folder"], workdir / "bertimbau-moe-8x")


def _dataloader(namespace: dict, workdir: Path, fixtures) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures["moe_folder"])
    texts = ["o contrato é da lei", "a notícia do governo", "o médico está com ela", "não há saúde sem ele"]
    namespace["train_dataloader"] = [dict(tokenizer(texts[:2], padding=True, return_tensors="pt"))] + [
        dict(tokenizer(texts[2:], padding=True, return_tensors="pt"))
    ]


def _fp32_model(namespace: dict, workdir: Path, fixtures) -> None:
    from transformers import AutoModelForSequenceClassification

    namespace["fp32_model"] = AutoModelForSequenceClassification.from_pretrained(fixtures["moe_folder"])


def _calibration_text(namespace: dict, workdir: Path, fixtures) -> None:
    # Sentences in the stand-in tokenizer's words, so calibration sees real (non-[UNK]) tokens.
    lines = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS) - 12, 3)]
    for name in ("calibracao.txt", "corpus.txt"):
        (workdir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _domain_models(namespace: dict, workdir: Path, fixtures) -> None:
    for seed, name in enumerate(("bert-juridico", "bert-noticias", "bert-geral")):
        save_tiny_bert(workdir / "out" / name, seed=seed)


def _switch_folder(namespace: dict, workdir: Path, fixtures) -> None:
    save_tiny_switch(workdir / "switch-local")
    namespace["path"] = str(workdir / "switch-local")


def _fresh_folder(namespace: dict, workdir: Path, fixtures) -> None:
    """Run in a new empty folder: for a block that is the alternative of an earlier one and writes the same output."""
    fresh = workdir / "fresh"
    fresh.mkdir(exist_ok=True)
    os.chdir(fresh)


SETUPS: dict[str, Callable[[dict, Path, dict], None]] = {
    "bert-batch": _bert_batch,  # input_ids, attention_mask, labels (sequence classification)
    "t5-batch": _t5_batch,  # ids, mask, labels (seq2seq)
    "moe-folder": _moe_folder,  # ./bertimbau-moe-8x, a tiny upcycled MoE-BERT with tokenizer
    "dataloader": _dataloader,  # train_dataloader: batches of input_ids / attention_mask
    "fp32-model": _fp32_model,  # fp32_model: a tiny MoE-BERT sequence classifier
    "calibration-text": _calibration_text,  # ./calibracao.txt and ./corpus.txt
    "domain-models": _domain_models,  # ./out/bert-juridico, ./out/bert-noticias, ./out/bert-geral
    "switch-folder": _switch_folder,  # path: a local transformers SwitchTransformers folder
    "fresh-folder": _fresh_folder,  # run in an empty folder
}


# --- running a block -------------------------------------------------------------------------------------------------


def bash_commands(code: str) -> list[str]:
    """Join continuation lines and drop comments and blank lines."""
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def run_bash(block: Block, workdir: Path, env: dict[str, str]) -> None:
    import ptmoe.cli

    for command in bash_commands(block.code):
        words = shlex.split(command, comments=True)
        if words and words[0] == "ptmoe":
            code = ptmoe.cli.main(words[1:])
            assert code == 0, f"{block.where}: `{command}` exited with {code}"
        else:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=os.getcwd(),
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, (
                f"{block.where}: `{command}` failed:\n{result.stdout}\n{result.stderr}"
            )


def page_blocks(path: Path) -> list[Block]:
    return [block for block in parse_blocks(path) if block.language in ("python", "bash")]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_code_blocks_run(path, hub_cache, moe_folder, tmp_path, monkeypatch):
    """Each page's python / bash blocks, in order, in one namespace and folder; skipped ones name their reason."""
    import huggingface_hub.constants

    blocks = page_blocks(path)
    for block in blocks:
        unknown = set(block.setups) - set(SETUPS)
        assert not unknown, (
            f"{block.where}: unknown doc-test setup {sorted(unknown)}; known: {sorted(SETUPS)}"
        )
    runnable = [block for block in blocks if block.skip is None]
    if not runnable:
        pytest.skip(f"no runnable block ({len(blocks)} marked skip)")

    # Hub ids resolve to the stand-ins; nothing may reach the network; errors keep their traceback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PTMOE_DEBUG", "1")
    monkeypatch.setenv("PTMOE_CACHE", str(tmp_path / "ptmoe-cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    fixtures = {"moe_folder": moe_folder}
    namespace: dict = {"__name__": "__doc_test__"}
    for block in runnable:
        monkeypatch.chdir(tmp_path)
        for name in block.setups:
            SETUPS[name](namespace, tmp_path, fixtures)
        if block.language == "python":
            try:
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    exec(compile(block.code, block.where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{block.where}: the python block failed: {error!r}") from error
        else:
            run_bash(block, tmp_path, dict(os.environ))


def test_skip_markers_and_setups_are_well_formed():
    """A marker must sit right before a python/bash fence; parsing also refuses a skip without its reason."""
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.startswith("<!--") and "doc-test" in line:
                assert MARKER.match(line), f"{path.name}:{number + 1}: malformed marker {line!r}"
                following = FENCE.match(lines[number + 1]) if number + 1 < len(lines) else None
                assert following and following.group(1) in ("python", "bash"), (
                    f"{path.name}:{number + 1}: a doc-test marker must be the line just before a python/bash block"
                )
        parse_blocks(path)


# --- links -----------------------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation removed (word characters, '-' and spaces stay),
    spaces → '-'."""
    text = re.sub(r"`|\*\*|\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading and not in_code:
            anchor = github_anchor(heading.group(1))
            found.add(anchor if anchor not in counts else f"{anchor}-{counts[anchor]}")
            counts[anchor] = counts.get(anchor, 0) + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    result = []
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            result.extend((number, target) for target in LINK.findall(re.sub(r"`[^`]*`", "", line)))
    return result


def test_github_anchor_rules():
    assert github_anchor("Forward throughput (`bench_forward`)") == "forward-throughput-bench_forward"
    assert github_anchor("Início rápido (português)") == "início-rápido-português"
    assert (
        github_anchor("Sparse inference: split → fit routers → distil")
        == "sparse-inference-split--fit-routers--distil"
    )


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Every relative link names an existing file, and its #anchor an existing heading of that file."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{path.name}:{number}: {target} — no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(
                f"{path.name}:{number}: {target} — no heading with anchor #{anchor} in {destination.name}"
            )
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [
        path.name for path in DOC_FILES[1:] if path.name != "README.md" and f"]({path.name})" not in index
    ]
    assert not missing, f"docs/README.md does not link {missing}"


def test_readme_length():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move detail to docs/ (limit {README_MAX_LINES})"
    )


def test_readme_keeps_the_two_fresh_machine_commands():
    """.ci/run runs the README's test command; both commands must stay exactly as they are."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        'pip install torch==2.13.0 && pip install -e ".[dev]" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ptmoe demo'
        in readme
    )
    assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q\n" in readme
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
