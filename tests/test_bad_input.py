"""The bad-input battery: every bad input is a clear, early error, and nothing on disk is lost or half-written.

Two tables, one row per bad input; add a row to extend the battery:

- `LIBRARY`: a `Case` calls the library and must raise `error` with a message matching `match`.
- `COMMANDS`: a `Command` runs `ptmoe …`, a script or `python -m hub_upload …` in-process and must exit with 2,
  printing one line `<prog>: error: <message matching match>` and no traceback.

Every row runs in its own folder `ws.tmp` (also the working directory) that already holds a user's folder
`ws.precious` with files in it, next to read-only artefacts shared by all rows (`ws.shared`: tiny checkpoints, a
truncated one, a pickle-only one, …). After the row, both trees must be exactly as before: no file changed, none
removed, and no new file or folder (no partial output, no staging leftovers).

Two real subprocesses at the end prove that the entry points print no traceback; `--debug` and `PTMOE_DEBUG=1`
bring it back (tested in-process). `test_every_subcommand_rejects_an_unknown_option` and
`test_every_script_uses_the_error_path` discover the subcommands and scripts, so ones added later are covered
without a new row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_training import make_bert_tokenizer, make_t5_tokenizer
from transformers import BitsAndBytesConfig, GPT2Config, GPT2Model, TrainingArguments

import ptmoe
from ptmoe import training
from ptmoe.cli import build_parser
from ptmoe.cli import main as cli_main
from ptmoe.convert import convert_switch_to_folder
from ptmoe.errors import MissingDependencyError, run_script
from ptmoe.metrics import load_metric

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "ptmoe" / "data"
NAN, INF = math.nan, math.inf

pytestmark = pytest.mark.usefixtures("one_thread")

BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_layers=[0, 1])
T5 = dict(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0
)


# --------------------------------------------------------------------------------------------------------------
# The workspace every row runs in
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    shared: Path  # read-only artefacts built once per module
    tmp: Path  # this row's folder and working directory
    models: dict  # tiny in-memory models, built once

    @property
    def precious(self) -> Path:
        """A user's non-empty folder: must survive every row untouched."""
        return self.tmp / "precious"

    def __getitem__(self, name: str) -> str:
        """Path of a shared artefact, as a string (the form the command line gets)."""
        return str(self.shared / name)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too) → content hash (`"dir"` for folders)."""
    return {
        path.relative_to(root).as_posix(): "dir"
        if path.is_dir()
        else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Tiny checkpoints with tokenizers, broken checkpoints and data files, shared (read-only) by every row."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        SwitchTransformersConfig,
        SwitchTransformersForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    bert_tokenizer, t5_tokenizer = make_bert_tokenizer(), make_t5_tokenizer()
    vocab = len(bert_tokenizer)
    moe_bert = ptmoe.MoeBertForMaskedLM(ptmoe.MoeBertConfig(vocab_size=vocab, **BERT, **MOE))
    for name, model in (
        ("moe_bert", moe_bert),
        ("dense_bert", BertForMaskedLM(BertConfig(vocab_size=vocab, **BERT))),
    ):
        model.save_pretrained(root / name)
        bert_tokenizer.save_pretrained(root / name)
    t5_config = ptmoe.MoeT5Config(
        vocab_size=len(t5_tokenizer), **T5, num_experts=4, encoder_moe_layers=[1], decoder_moe_layers=[1]
    )
    ptmoe.MoeT5ForConditionalGeneration(t5_config).save_pretrained(root / "moe_t5")
    t5_tokenizer.save_pretrained(root / "moe_t5")
    switch = SwitchTransformersConfig(vocab_size=99, **T5, num_experts=4, expert_capacity=8)
    SwitchTransformersForConditionalGeneration(switch).save_pretrained(root / "switch")

    # A download cut in half, and a folder with only pickled weights.
    shutil.copytree(root / "moe_bert", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "pickle_only").mkdir()
    shutil.copy(root / "moe_bert" / "config.json", root / "pickle_only")
    torch.save(moe_bert.state_dict(), root / "pickle_only" / "pytorch_model.bin")

    (root / "a_file.txt").write_text("not a folder")
    (root / "corpus.pdf").write_text("%PDF-1.4")
    (root / "broken.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def models(shared):
    torch.manual_seed(0)
    return {
        "bert": ptmoe.MoeBertModel(ptmoe.MoeBertConfig(vocab_size=99, **BERT, **MOE)).eval(),
        "bert_hash": ptmoe.MoeBertModel(
            ptmoe.MoeBertConfig(
                vocab_size=99, **BERT, **{**MOE, "num_experts_per_tok": 1}, router_type="hash"
            )
        ).eval(),
        "t5": ptmoe.MoeT5ForConditionalGeneration(
            ptmoe.MoeT5Config(
                vocab_size=99, **T5, num_experts=4, encoder_moe_layers=[1], decoder_moe_layers=[1]
            )
        ).eval(),
        "gpt2": GPT2Model(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=32)),
    }


@pytest.fixture
def ws(shared, models, tmp_path, monkeypatch):
    """This row's workspace; asserts afterwards that nothing on disk changed."""
    work = tmp_path / "work"
    (work / "precious" / "notes").mkdir(parents=True)
    (work / "precious" / "README.md").write_text("Anotações que não podem sumir.")
    (work / "precious" / "notes" / "model.safetensors").write_bytes(b"a user's weights")
    monkeypatch.chdir(work)
    before = snapshot(work), snapshot(shared)
    yield Workspace(shared=shared, tmp=work, models=models)
    assert (snapshot(work), snapshot(shared)) == before, "a file changed, or partial output was left behind"


def ids(n: int = 1, length: int = 8) -> torch.Tensor:
    return torch.randint(5, 99, (n, length))


# --------------------------------------------------------------------------------------------------------------
# Table 1: the library
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Workspace], object]
    error: type[BaseException]
    match: str  # regex the message must contain (it names the problem)


def _bert_config(**overrides):
    return ptmoe.MoeBertConfig(vocab_size=99, **{**BERT, **MOE, **overrides})


def _t5_config(**overrides):
    return ptmoe.MoeT5Config(vocab_size=99, **{**T5, "num_experts": 4, **overrides})


def _forward_t5(ws, **inputs):
    return ws.models["t5"](**inputs)


def _bnb_config_without_bitsandbytes(ws):
    from unittest import mock

    with mock.patch("importlib.util.find_spec", return_value=None):
        return ptmoe.bnb_4bit_config()


def _train_args(ws, *flags):
    return training.parse_arguments(
        (training.ModelArguments, training.DataArguments, TrainingArguments),
        ["--model_name_or_path", ws["moe_bert"], "--output_dir", "out", *flags],
    )


LIBRARY = [
    # configs: every float field refuses nan/inf; other MoE fields name themselves
    Case("config-aux-loss-nan", lambda ws: _bert_config(router_aux_loss_coef=NAN), ValueError, "`router_aux_loss_coef` must be a finite"),
    Case("config-z-loss-inf-t5", lambda ws: _t5_config(router_z_loss_coef=INF), ValueError, "`router_z_loss_coef` must be a finite"),
    Case("config-capacity-inf", lambda ws: _bert_config(capacity_factor=INF), ValueError, "`capacity_factor` must be a finite"),
    Case("config-jitter-nan-t5", lambda ws: _t5_config(router_jitter_noise=NAN), ValueError, "`router_jitter_noise`"),
    Case("config-bert-dropout-nan", lambda ws: _bert_config(hidden_dropout_prob=NAN), ValueError, "`hidden_dropout_prob` must be a finite"),
    Case("config-top-k-above-experts", lambda ws: _bert_config(num_experts_per_tok=5), ValueError, r"`num_experts_per_tok` \(5\) cannot be larger"),
    Case("config-unknown-router", lambda ws: _bert_config(router_type="expert_choice_v9"), ValueError, "`router_type` must be one of"),
    Case("config-moe-layer-out-of-range", lambda ws: _bert_config(moe_layers=[5]), ValueError, "`moe_layers` contains layer index 5"),
    Case("config-t5-unknown-activation", lambda ws: _t5_config(feed_forward_proj="gated-foo"), ValueError, "`feed_forward_proj`"),
    # loading checkpoints
    Case("load-wrong-expert-count", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["moe_bert"], num_experts=8), ValueError, "MoE layers do not match the model config"),
    Case("load-other-moe-layers", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["moe_bert"], moe_layers=[0]), ValueError, "17 unexpected"),
    Case("load-dense-checkpoint", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["dense_bert"]), ValueError, "it is a dense checkpoint.*ptmoe upcycle"),
    Case("load-truncated-safetensors", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["truncated"]), OSError, "damaged or incomplete"),
    Case("load-pickle-only-folder", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["pickle_only"]), ValueError, r"only pickled weights \(pytorch_model.bin\)"),
    Case("load-missing-local-folder", lambda ws: ptmoe.MoeBertModel.from_pretrained("./checkpoints/moe"), FileNotFoundError, "'./checkpoints/moe': no such folder"),
    Case("load-file-not-folder", lambda ws: ptmoe.MoeBertModel.from_pretrained(ws["a_file.txt"]), NotADirectoryError, "is a file"),
    Case("load-4bit-bad-quant-type", lambda ws: ptmoe.MoeBertForMaskedLM.from_pretrained(ws["moe_bert"], quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int3")), ValueError, "converting its weights: ValueError: quant_type must be 'nf4' or 'fp4'"),
    # forwards: shapes are checked before any tensor code
    Case("bert-mask-shape", lambda ws: ws.models["bert"](ids(2, 8), attention_mask=torch.ones(2, 7)), ValueError, r"`attention_mask` has shape \(2, 7\) but `input_ids` needs \(2, 8\)"),
    Case("bert-too-long", lambda ws: ws.models["bert"](ids(1, 65)), ValueError, "65 tokens.*64 positions .`max_position_embeddings`"),
    Case("bert-no-batch-dimension", lambda ws: ws.models["bert"](ids(1, 8)[0]), ValueError, r"`input_ids` must have shape \(batch_size, sequence_length\)"),
    Case("bert-token-type-shape", lambda ws: ws.models["bert"](ids(2, 8), token_type_ids=torch.zeros(2, 9, dtype=torch.long)), ValueError, "`token_type_ids` has shape"),
    Case("bert-empty-sequence", lambda ws: ws.models["bert"](ids(2, 0)), ValueError, "`input_ids` is empty"),
    Case("bert-hash-router-embeds", lambda ws: ws.models["bert_hash"](inputs_embeds=torch.randn(1, 4, 32)), ValueError, "routes by token id: pass `input_ids`"),
    Case("t5-encoder-mask-shape", lambda ws: _forward_t5(ws, input_ids=ids(2, 8), attention_mask=torch.ones(2, 9), decoder_input_ids=ids(2, 3)), ValueError, r"`attention_mask` has shape \(2, 9\)"),
    Case("t5-decoder-mask-shape", lambda ws: _forward_t5(ws, input_ids=ids(2, 8), decoder_input_ids=ids(2, 3), decoder_attention_mask=torch.ones(2, 4)), ValueError, r"`decoder_attention_mask` has shape \(2, 4\) but `decoder_input_ids` needs \(2, 3\)"),
    Case("t5-decoder-batch", lambda ws: _forward_t5(ws, input_ids=ids(2, 8), decoder_input_ids=ids(3, 3)), ValueError, "`decoder_input_ids` has batch size 3 but the encoder output has 2"),
    # upcycling
    Case("upcycle-one-expert", lambda ws: ptmoe.upcycle(ws["dense_bert"], num_experts=1), ValueError, "num_experts"),
    Case("upcycle-unknown-method", lambda ws: ptmoe.upcycle(ws["dense_bert"], method="clone"), ValueError, "method"),
    Case("upcycle-unsupported-architecture", lambda ws: ptmoe.upcycle(ws.models["gpt2"]), ValueError, "Supported dense architectures"),
    Case("upcycle-missing-folder", lambda ws: ptmoe.upcycle("models/bert/base"), FileNotFoundError, "'models/bert/base': no such folder"),
    Case("save-into-users-folder", lambda ws: ptmoe.save_upcycled(ws.models["bert"], ws.precious, tokenizer=False), FileExistsError, "not empty.*overwrite"),
    # LoRA per expert
    Case("lora-rank-zero", lambda ws: ptmoe.expert_lora_config(ws.models["bert"], r=0), ValueError, r"`r` \(the LoRA rank\) must be an integer >= 1"),
    Case("lora-not-an-moe-layer", lambda ws: ptmoe.expert_lora_config(ws.models["bert"], experts={9: [0]}), ValueError, "Layer 9 is not an MoE layer"),
    Case("lora-expert-out-of-range", lambda ws: ptmoe.expert_lora_config(ws.models["bert"], experts={0: [7]}), ValueError, "Expert 7 of layer 0 is out of range"),
    # quantization
    Case("bnb-compute-dtype", lambda ws: ptmoe.bnb_4bit_config(compute_dtype="float99"), ValueError, "`compute_dtype` must be one of"),
    Case("bnb-integer-compute-dtype", lambda ws: ptmoe.bnb_4bit_config(compute_dtype=torch.int8), ValueError, "`compute_dtype`"),
    Case("bnb-quant-type", lambda ws: ptmoe.bnb_4bit_config(quant_type="int4"), ValueError, "`quant_type` must be 'nf4' or 'fp4'"),
    Case("bnb-skip-modules-string", lambda ws: ptmoe.bnb_4bit_config(skip_modules="classifier"), ValueError, "`skip_modules` must be a list"),
    Case("bnb-not-installed", _bnb_config_without_bitsandbytes, MissingDependencyError, "pip install bitsandbytes"),
    Case("int8-needs-fp32", lambda ws: ptmoe.quantize_dynamic_int8(ptmoe.MoeBertModel(_bert_config()).to(torch.bfloat16)), ValueError, "needs an fp32 model"),
    Case("footprint-bits", lambda ws: ptmoe.estimate_quantized_footprint(ws.models["bert"], bits=3), ValueError, "`bits` must be 4 or 8"),
    # zoo, metrics, conversion
    Case("zoo-unknown-model", lambda ws: ptmoe.create_model("moe-bertimbau-tiny-99e"), ValueError, "Unknown ptmoe model 'moe-bertimbau-tiny-99e'"),
    Case("metric-unknown", lambda ws: load_metric("meteor"), ValueError, "Unknown metric 'meteor'"),
    Case("convert-not-switch", lambda ws: ptmoe.convert_switch_transformers(ws.models["bert"]), ValueError, "expected a SwitchTransformers checkpoint"),
    Case("convert-missing-folder", lambda ws: ptmoe.convert_switch_transformers("./switch-base-8"), FileNotFoundError, "no such folder"),
    Case("convert-into-users-folder", lambda ws: convert_switch_to_folder(ws["switch"], ws.precious), FileExistsError, "not empty"),
    # training library
    Case("training-expert-list", lambda ws: training.parse_expert_list("0,x"), ValueError, "--lora_experts must be"),
    Case("training-data-extension", lambda ws: training.load_raw_datasets(train_file=ws["corpus.pdf"]), ValueError, "--train_file .* has extension '.pdf'"),
    Case("training-missing-dataset-folder", lambda ws: training.load_raw_datasets(dataset_name="./data/assin2"), FileNotFoundError, "--dataset_name './data/assin2': no such folder"),
    Case("training-label-file", lambda ws: training.read_label_names(ws["broken.json"]), ValueError, "--label_names_file .* is not a readable JSON"),
    Case("training-output-dir", lambda ws: training.check_training_output_dir(_train_args(ws, "--output_dir", str(ws.precious))[2]), FileExistsError, "--output_dir .* not empty.*--overwrite_output_dir"),
]  # fmt: skip


@pytest.mark.parametrize("case", LIBRARY, ids=lambda case: case.id)
def test_library_bad_input(case: Case, ws):
    with pytest.raises(case.error, match=case.match):
        case.call(ws)


# --------------------------------------------------------------------------------------------------------------
# Table 2: the command line (ptmoe, every script, hub_upload), in-process
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    id: str
    tool: str  # "ptmoe", "hub_upload" or a script name in scripts/
    argv: Callable[[Workspace], list[str]]
    match: str  # regex the error line must contain


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"ptmoe_bad_input_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_tool(tool: str, argv: list[str], monkeypatch) -> tuple[int, str]:
    """Run a command in-process the way its entry point does; returns (exit code, error-line prefix)."""
    if tool == "ptmoe":
        try:
            return cli_main(argv), f"ptmoe {argv[0]}"
        except SystemExit as exit_:  # argparse
            return exit_.code, f"ptmoe {argv[0]}"
    if tool == "hub_upload":
        from hub_upload.__main__ import main as hub_upload_main

        return hub_upload_main(argv), f"hub_upload {argv[0]}"
    monkeypatch.setattr(sys, "argv", [f"scripts/{tool}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        run_script(load_script(tool).main)
    return exit_.value.code, f"{tool}.py"


# Tiny runs: a bad input must stop the script before any of this matters.
FAST = ["--max_steps", "1", "--max_train_samples", "4", "--report_to", "none", "--save_strategy", "no"]


def _script(ws, *flags, model: str = "moe_bert", out: str = "out"):
    return ["--model_name_or_path", ws[model], "--output_dir", out, *FAST, *flags]


SENTIMENT = ["--train_file", str(DATA / "sentiment_train.jsonl")]

COMMANDS = [
    # ptmoe upcycle
    Command("upcycle-missing-base", "ptmoe", lambda ws: ["upcycle", "--base", "./bert-base", "--out", "moe"], "--base './bert-base': no such folder"),
    Command("upcycle-non-empty-out", "ptmoe", lambda ws: ["upcycle", "--base", ws["dense_bert"], "--out", str(ws.precious)], "exists and is not empty.*--overwrite"),
    Command("upcycle-one-expert", "ptmoe", lambda ws: ["upcycle", "--base", ws["dense_bert"], "--experts", "1", "--out", "moe", "--no-progress"], "num_experts"),
    Command("upcycle-not-an-int", "ptmoe", lambda ws: ["upcycle", "--base", ws["dense_bert"], "--experts", "eight", "--out", "moe"], "argument --experts: invalid int value"),
    Command("upcycle-unsupported", "ptmoe", lambda ws: ["upcycle", "--base", ws["switch"], "--out", "moe", "--no-progress"], "Supported dense architectures"),
    # ptmoe convert-switch
    Command("convert-missing-source", "ptmoe", lambda ws: ["convert-switch", "./switch-base-8", "moe"], "source './switch-base-8': no such folder"),
    Command("convert-dense-source", "ptmoe", lambda ws: ["convert-switch", ws["dense_bert"], "moe"], "expected a SwitchTransformers checkpoint"),
    Command("convert-non-empty-out", "ptmoe", lambda ws: ["convert-switch", ws["switch"], str(ws.precious)], "not empty"),
    # ptmoe cards / list
    Command("cards-missing-results", "ptmoe", lambda ws: ["cards", "--eval-results", "results.json", "--out", "cards"], "results.json"),
    Command("cards-unknown-model", "ptmoe", lambda ws: ["cards", "--out", "cards", "moe-bertimbau-base-top2-8e", "moe-gpt-99e"], "Unknown ptmoe model 'moe-gpt-99e'"),
    Command("list-bad-option", "ptmoe", lambda ws: ["list", "--counts"], "unrecognized arguments: --counts"),
    # ptmoe demo: validated before anything is written, never into a user's folder without --overwrite
    Command("demo-non-empty-output", "ptmoe", lambda ws: ["demo", "--quick", "--output-dir", str(ws.precious)], "not empty.*--overwrite"),
    Command("demo-overwrite-working-dir", "ptmoe", lambda ws: ["demo", "--quick", "--output-dir", ".", "--overwrite"], "refusing to replace .*current directory"),
    Command("demo-output-is-a-file", "ptmoe", lambda ws: ["demo", "--quick", "--output-dir", str(ws.precious / "README.md")], "is not a directory"),
    Command("demo-one-expert", "ptmoe", lambda ws: ["demo", "--quick", "--experts", "1", "--output-dir", "demo"], "--experts must be >= 2"),
    Command("demo-top-k", "ptmoe", lambda ws: ["demo", "--quick", "--top-k", "5", "--output-dir", "demo"], r"`num_experts_per_tok` \(5\) cannot be larger"),
    Command("demo-nan-epochs", "ptmoe", lambda ws: ["demo", "--quick", "--pretrain-epochs", "nan", "--output-dir", "demo"], "--pretrain-epochs must be a finite number"),
    # the Trainer scripts
    Command("classification-missing-model", "finetune_classification", lambda ws: ["--model_name_or_path", "./my-moe", "--output_dir", "out", *SENTIMENT], "--model_name_or_path './my-moe': no such folder"),
    Command("classification-missing-column", "finetune_classification", lambda ws: _script(ws, *SENTIMENT, "--text_column", "texto"), r"no column 'texto' \(named by --text_column\)"),
    Command("classification-bad-tuning", "finetune_classification", lambda ws: _script(ws, *SENTIMENT, "--tuning", "prefix"), "argument --tuning: invalid choice"),
    Command("ner-label-file", "finetune_ner", lambda ws: _script(ws, "--train_file", str(DATA / "ner_train.jsonl"), "--label_names_file", "labels.json"), "--label_names_file 'labels.json' is not a readable JSON"),
    Command("seq2seq-unknown-metric", "finetune_seq2seq", lambda ws: _script(ws, "--train_file", str(DATA / "summarization_train.jsonl"), "--metrics", "meteor", model="moe_t5"), "--metrics must be a comma list among rouge, bleu"),
    Command("mlm-data-extension", "train_mlm", lambda ws: _script(ws, "--train_file", ws["corpus.pdf"]), "has extension '.pdf'"),
    Command("mlm-non-empty-output", "train_mlm", lambda ws: _script(ws, "--train_file", str(DATA / "corpus.txt"), out=str(ws.precious)), "not empty.*--overwrite_output_dir"),
    Command("mlm-dense-without-upcycling", "train_mlm", lambda ws: _script(ws, "--train_file", str(DATA / "corpus.txt"), model="dense_bert"), "dense 'bert' checkpoint: pass --upcycle_experts"),
    # benchmarks
    Command("bench-forward-family", "bench_forward", lambda ws: ["--quick", "--families", "gpt"], "argument --families: invalid choice"),
    Command("bench-memory-threads", "bench_memory", lambda ws: ["--quick", "--threads", "two"], "argument --threads: invalid int value"),
    Command("bench-upcycle-method", "bench_upcycle", lambda ws: ["--quick", "--methods", "clone"], "argument --methods: invalid choice"),
    # hub_upload
    Command("hub-prepare-missing-model", "hub_upload", lambda ws: ["prepare", "./my-moe", "hub"], "has no config.json"),
    Command("hub-push-unverified", "hub_upload", lambda ws: ["push", str(ws.precious), "--repo-id", "ptmoe-test/x"], "is not verified"),
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.id)
def test_command_bad_input(command: Command, ws, capsys, monkeypatch):
    code, prog = run_tool(command.tool, command.argv(ws), monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(error_lines) == 1, err
    assert re.search(command.match, error_lines[0]), error_lines[0]


def test_every_subcommand_rejects_an_unknown_option(capsys):
    """Discovered from the parser, so subcommands added later are covered too."""
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"upcycle", "convert-switch", "demo", "cards", "list", "info"} <= set(subcommands)
    for name in subcommands:
        with pytest.raises(SystemExit) as exit_:
            cli_main([name, "--no-such-option"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        # the subcommand's own parser answers (an unknown option, or first the required arguments it misses)
        assert re.search(
            rf"^ptmoe {name}: error: (unrecognized arguments|the following arguments)", err, re.M
        )


SCRIPTS = sorted(path.stem for path in (REPO / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_uses_the_error_path(name, capsys, monkeypatch, tmp_path):
    """Discovered from scripts/: each ends with `run_script(main)` and answers a bad option with one line, exit 2."""
    source = (REPO / "scripts" / f"{name}.py").read_text(encoding="utf-8")
    assert "run_script(main)" in source, f"scripts/{name}.py: end it with `run_script(main)` (ptmoe.errors)"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"scripts/{name}.py", "--no-such-option"])
    with pytest.raises(SystemExit) as exit_:
        run_script(load_script(name).main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert re.search(rf"^{name}\.py: error: ", err, re.M), err
    assert list(tmp_path.iterdir()) == []


def test_internal_bugs_keep_their_traceback():
    """Only user errors become one line: a bug (here a TypeError) propagates with its traceback."""
    from ptmoe.errors import run_command

    def buggy(_):
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):
        run_command(buggy, None, prog="ptmoe x")


def test_debug_flag_reraises_user_errors(ws, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cli_main(["upcycle", "--base", "./missing", "--out", "moe", "--debug"])
    monkeypatch.setenv("PTMOE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli_main(["upcycle", "--base", "./missing", "--out", "moe"])


# --------------------------------------------------------------------------------------------------------------
# Nothing lost when the user asked for --overwrite, and nothing half-written when a run fails
# --------------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_only_after_success(tmp_path):
    from ptmoe.outputs import staged_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("the run failed")
    assert snapshot(tmp_path) == {"out": "dir", "out/old.txt": hashlib.sha256(b"old").hexdigest()}
    with staged_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new.txt", "out"]


def test_killed_command_removes_its_staging_folder(tmp_path):
    """`kill` (SIGTERM) during a `ptmoe` command unwinds like Ctrl-C: the staging folder goes, the handler is restored."""
    import signal

    from ptmoe.errors import run_command
    from ptmoe.outputs import staged_output_dir

    def command(out):
        with staged_output_dir(out) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        run_command(command, tmp_path / "out", prog="ptmoe x", exit_on_sigterm=True)
    assert exit_.value.code == 143 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_demo_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    from ptmoe import demo

    def fail(config, out, final_out):
        (out / "tokenizer").mkdir()
        raise OSError("No space left on device")

    monkeypatch.setattr(demo, "_run_stages", fail)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("keep")
    left = lambda: sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))  # noqa: E731
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(demo.DemoConfig.quick(output_dir=str(tmp_path / "demo"), overwrite=True))
    assert left() == ["demo", "demo/keep.txt"]
    with pytest.raises(OSError, match="No space left"):  # parent folders made for the output go too
        demo.run_demo(demo.DemoConfig.quick(output_dir=str(tmp_path / "runs" / "today" / "demo")))
    assert left() == ["demo", "demo/keep.txt"]


# --------------------------------------------------------------------------------------------------------------
# The real entry points, in fresh processes: one line, exit 2, no traceback (--debug / PTMOE_DEBUG: see above)
# --------------------------------------------------------------------------------------------------------------
def test_entry_points_in_fresh_processes(tmp_path):
    upcycle = [sys.executable, "-m", "ptmoe.cli", "upcycle", "--base", "./missing", "--out", "moe"]
    script = [
        sys.executable, str(REPO / "scripts" / "train_mlm.py"), "--model_name_or_path", "./missing",
        "--train_file", str(DATA / "corpus.txt"), "--output_dir", "out",
    ]  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k != "PTMOE_DEBUG"}, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in (upcycle, script)
    ]
    (_, cli_err), (_, script_err) = (process.communicate(timeout=300) for process in processes)
    assert processes[0].returncode == 2 and cli_err.strip() == (
        f"ptmoe upcycle: error: --base './missing': no such folder (current directory {str(tmp_path)!r}). "
        "Check the path; a Hub id has the form 'name' or 'org/name'."
    ), cli_err
    assert processes[1].returncode == 2 and "Traceback" not in script_err, script_err
    last_line = script_err.strip().splitlines()[-1]
    assert last_line.startswith("train_mlm.py: error: --model_name_or_path './missing': no such folder")
    assert list(tmp_path.iterdir()) == []
