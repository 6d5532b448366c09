"""End-to-end tests of the Trainer scripts on the shipped data with tiny models, plus bad input and DDP.

Scripts run in-process through their `main(args)` (fast); the DDP test runs `accelerate launch` for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import make_bert_tokenizer, make_t5_tokenizer

import ptmoe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "ptmoe" / "data"
SCRIPTS = REPO / "scripts"

# Small everything: a few optimizer steps on a handful of examples.
FAST = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "8",
    "--max_train_samples", "16",
    "--max_eval_samples", "8",
    "--max_seq_length", "32",
    "--report_to", "none",
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--disable_tqdm", "True",
    "--dataloader_pin_memory", "False",
    "--seed", "0",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"ptmoe_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_bert_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, moe_layers=[0, 1],
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny MoE-BERT (MLM head), MoE-T5, dense BERT and a sentiment classifier, each saved with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    bert_tokenizer, t5_tokenizer = make_bert_tokenizer(), make_t5_tokenizer()
    paths = {}

    def save(name, model, tokenizer):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)

    bert_kwargs = tiny_bert_kwargs(len(bert_tokenizer))
    save("moe_bert", ptmoe.MoeBertForMaskedLM(ptmoe.MoeBertConfig(**bert_kwargs)), bert_tokenizer)
    classifier_config = ptmoe.MoeBertConfig(
        **bert_kwargs,
        num_labels=2,
        id2label={0: "negativo", 1: "positivo"},
        label2id={"negativo": 0, "positivo": 1},
    )
    save("sentiment_classifier", ptmoe.MoeBertForSequenceClassification(classifier_config), bert_tokenizer)
    dense = {
        k: v for k, v in bert_kwargs.items() if k not in ("num_experts", "num_experts_per_tok", "moe_layers")
    }
    save("dense_bert", BertForMaskedLM(BertConfig(**dense)), bert_tokenizer)
    t5_config = ptmoe.MoeT5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, num_experts_per_tok=2, encoder_moe_layers=[1], decoder_moe_layers=[1],
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0,
    )  # fmt: skip
    save("moe_t5", ptmoe.MoeT5ForConditionalGeneration(t5_config), t5_tokenizer)
    return paths


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def assert_saved_once(output_dir: Path, weights: str = "model.safetensors") -> None:
    found = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.safetensors"))
    assert found == [weights], found
    assert {p.name for p in output_dir.rglob("*.bin")} <= {"training_args.bin"}, "weights only as safetensors"
    assert (output_dir / "tokenizer.json").exists()
    assert (output_dir / "expert_load.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------------------
# Each script end to end on the shipped data
# --------------------------------------------------------------------------------------------------------------
def test_finetune_classification_sentiment(checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "sentiment"
    metrics = load_script("finetune_classification").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "sentiment_train.jsonl"),
        "--validation_file", str(DATA / "sentiment_test.jsonl"),
        "--text_column", "text", "--label_column", "label",
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert_saved_once(out)
    assert {"eval_accuracy", "eval_f1", "router/layer_0/load_std"} <= set(results(out))
    assert metrics["eval_accuracy"] == results(out)["eval_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(model, ptmoe.MoeBertForSequenceClassification) and model.config.num_labels == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model(**tokenizer(["Produto excelente."], return_tensors="pt")).logits.shape == (1, 2)


def test_finetune_classification_pair_regression(checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "similarity"
    load_script("finetune_classification").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "entailment_train.jsonl"),
        "--validation_file", str(DATA / "entailment_test.jsonl"),
        "--text_column", "premise", "--text_pair_column", "hypothesis", "--label_column", "similarity",
        "--task_type", "regression", "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert_saved_once(out)
    assert {"eval_pearson", "eval_spearman", "eval_mse"} <= set(results(out))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_finetune_classification_pair_expert_lora_merged(checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "entailment_lora"
    load_script("finetune_classification").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "entailment_train.jsonl"),
        "--validation_file", str(DATA / "entailment_test.jsonl"),
        "--text_column", "premise", "--text_pair_column", "hypothesis", "--label_column", "label",
        "--tuning", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_experts", "0,2", "--merge_lora",
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert sorted(p.name for p in out.rglob("*.safetensors")) == [
        "adapter_model.safetensors",
        "model.safetensors",
    ]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "classifier" in adapter["modules_to_save"]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(
        checkpoints["moe_bert"], num_labels=merged.config.num_labels
    )
    reloaded = PeftModel.from_pretrained(base, out)
    batch = {"input_ids": torch.tensor([[2, 40, 41, 42, 3]])}
    merged.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-5)


def test_finetune_classification_qlora(checkpoints, tmp_path):
    out = tmp_path / "sentiment_qlora"
    load_script("finetune_classification").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "sentiment_train.jsonl"),
        "--tuning", "qlora", "--lora_r", "4", "--do_train", "--output_dir", str(out),
        *FAST, "--max_steps", "1",
    ])  # fmt: skip
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_finetune_ner(checkpoints, tmp_path):
    from transformers import AutoModelForTokenClassification

    out = tmp_path / "ner"
    load_script("finetune_ner").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "ner_train.jsonl"),
        "--validation_file", str(DATA / "ner_test.jsonl"),
        "--tokens_column", "tokens", "--tags_column", "ner_tags",
        "--label_names_file", str(DATA / "ner_labels.json"),
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert_saved_once(out)
    assert {"eval_overall_f1", "eval_overall_precision", "eval_overall_recall"} <= set(results(out))
    model = AutoModelForTokenClassification.from_pretrained(out)
    labels = json.loads((DATA / "ner_labels.json").read_text())
    assert [model.config.id2label[i] for i in range(len(labels))] == labels


def test_finetune_seq2seq(checkpoints, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "summarization"
    load_script("finetune_seq2seq").main([
        "--model_name_or_path", checkpoints["moe_t5"],
        "--train_file", str(DATA / "summarization_train.jsonl"),
        "--validation_file", str(DATA / "summarization_test.jsonl"),
        "--source_column", "text", "--target_column", "summary", "--source_prefix", "resumir: ",
        "--max_target_length", "8", "--output_dir", str(out), *FAST, "--max_eval_samples", "4",
    ])  # fmt: skip
    assert_saved_once(out)
    assert {"eval_rouge1", "eval_rougeL", "eval_bleu", "eval_gen_len"} <= set(results(out))
    assert "router/decoder_layer_1/load_std" in results(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(
        **tokenizer(["resumir: A biblioteca abre."], return_tensors="pt"), max_new_tokens=4
    )
    assert generated.shape[0] == 1


def test_train_mlm_bert(checkpoints, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "mlm"
    load_script("train_mlm").main([
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "corpus.txt"), "--validation_split_percentage", "5",
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert_saved_once(out)
    assert results(out)["eval_perplexity"] > 1
    assert isinstance(AutoModelForMaskedLM.from_pretrained(out), ptmoe.MoeBertForMaskedLM)


def test_train_mlm_t5_span_corruption(checkpoints, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "span"
    load_script("train_mlm").main([
        "--model_name_or_path", checkpoints["moe_t5"],
        "--train_file", str(DATA / "corpus.txt"), "--validation_split_percentage", "5",
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert_saved_once(out)
    assert results(out)["eval_perplexity"] > 1
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(out), ptmoe.MoeT5ForConditionalGeneration)


def test_train_mlm_upcycles_a_dense_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "upcycled"
    load_script("train_mlm").main([
        "--model_name_or_path", checkpoints["dense_bert"], "--upcycle_experts", "4",
        "--train_file", str(DATA / "corpus.txt"), "--do_train", "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moe_bert" and config["num_experts"] == 4 and config["upcycled_from"]


# --------------------------------------------------------------------------------------------------------------
# Bad input stops early with a message naming the fix
# --------------------------------------------------------------------------------------------------------------
def test_missing_column_names_the_flag(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'texto' \(named by --text_column\)"):
        load_script("finetune_classification").main([
            "--model_name_or_path", checkpoints["moe_bert"],
            "--train_file", str(DATA / "sentiment_train.jsonl"), "--text_column", "texto",
            "--output_dir", str(tmp_path / "x"), *FAST,
        ])  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_labels_outside_the_model_label_set(checkpoints, tmp_path):
    rows = [{"text": "Nem bom nem ruim.", "label": "neutro"}, {"text": "Ótimo!", "label": "positivo"}] * 4
    data = tmp_path / "three_classes.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"\['neutro'\].*outside the model's label set \['negativo', 'positivo'\]"
    ):
        load_script("finetune_classification").main([
            "--model_name_or_path", checkpoints["sentiment_classifier"], "--train_file", str(data),
            "--output_dir", str(tmp_path / "x"), *FAST,
        ])  # fmt: skip


def test_unreachable_hub_dataset(checkpoints, tmp_path):
    with pytest.raises(
        ValueError, match="Could not load --dataset_name 'ptmoe-tests/assin2-missing'.*--train_file"
    ):
        load_script("finetune_ner").main([
            "--model_name_or_path", checkpoints["moe_bert"], "--dataset_name", "ptmoe-tests/assin2-missing",
            "--output_dir", str(tmp_path / "x"), *FAST,
        ])  # fmt: skip


def test_unknown_tuning_mode_is_an_argument_error(checkpoints, tmp_path):
    with pytest.raises(SystemExit):
        load_script("finetune_classification").main([
            "--model_name_or_path", checkpoints["moe_bert"], "--train_file", str(DATA / "sentiment_train.jsonl"),
            "--tuning", "prefix", "--output_dir", str(tmp_path / "x"),
        ])  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Beyond one machine: DDP over gloo with two CPU processes
# --------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_ddp(checkpoints, tmp_path):
    out = tmp_path / "ddp"
    port = _free_port()
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # `--cpu` selects accelerate's single-process launcher (several CPU processes need MPI there); the
    # multi-process launcher (torch.distributed.run) with ACCELERATE_USE_CPU=1 gives CPU DDP over gloo. The
    # shipped recipe examples/accelerate/ddp.yaml is what runs.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate" / "ddp.yaml"), "--main_process_port", str(port),
        str(SCRIPTS / "finetune_classification.py"),
        "--model_name_or_path", checkpoints["moe_bert"],
        "--train_file", str(DATA / "sentiment_train.jsonl"),
        "--validation_file", str(DATA / "sentiment_test.jsonl"),
        "--output_dir", str(out), *FAST, "--max_steps", "3",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (1, 2):
        assert f"ptmoe: process {rank}/2 finished" in run.stdout
    assert_saved_once(out)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "router/layer_0/load_std" in state["log_history"][0]
    # Binary cross-entropy of an untrained head is ≈ ln 2; a loss rescaled by the number of processes (the
    # Trainer's `num_items_in_batch` path, wrong for mean losses) would be ≈ 2 ln 2.
    assert state["log_history"][0]["loss"] < 1.0
    assert "eval_accuracy" in results(out)


# --------------------------------------------------------------------------------------------------------------
# Benchmarks: the quick mode runs, and the decode traffic diagnostic is right where the answer is known
# --------------------------------------------------------------------------------------------------------------
def test_decode_weight_traffic_is_one_with_every_token_on_one_expert():
    bench = load_script("bench_forward")
    cases = {case.name: case for case in bench.t5_cases(bench.T5_TINY)}
    mean_distinct, weights = bench.decode_weight_traffic(
        cases["MoE-T5 generate, 1 expert/step"], torch.float32, batch=8, seq=16
    )
    assert (mean_distinct, weights) == (1.0, 1.0)
    mean_distinct, weights = bench.decode_weight_traffic(
        cases["MoE-T5 top-1 generate"], torch.float32, batch=8, seq=16
    )
    assert 1.0 <= mean_distinct <= 8 and weights >= 1.0


def test_bench_forward_quick(capsys):
    load_script("bench_forward").main(["--quick", "--threads", "1", "--dtypes", "float32"])
    printed = capsys.readouterr().out
    assert "MoE-T5 top-1 generate / dense T5 generate" in printed
    assert "distinct experts per MoE layer and step" in printed
    assert "MoE-BERT expert choice (c=2) / MoE-BERT top-2" in printed
    assert "MoE-BERT hierarchical (4x2, top-2) / MoE-BERT top-2" in printed
