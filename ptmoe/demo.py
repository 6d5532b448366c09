"""The offline end-to-end demo (`ptmoe demo`): every stage of the checkpoint path on the shipped sample data.

    corpus.txt ──► WordPiece tokenizer ──► small dense BERT, brief MLM pre-training
        ──► upcycle to MoE-BERT (copy: reproduces the dense model) ──► expert-LoRA fine-tuning on sentiment
        ──► accuracy vs the dense model fine-tuned the same way ──► merged model reloaded in 4-bit NF4
        ──► Hub-ready folder verified with trust_remote_code in a fresh process ──► summary table + plots

Nothing is downloaded: the tokenizer, the dense model and the data are all built or shipped here. Data goes
through the same `ptmoe.training` functions as the Trainer scripts (tokenisation, labels, training arguments,
metrics). Every input is validated first; the demo runs in a temporary folder beside `--output-dir` and moves it
into place at the end, so a non-empty `--output-dir` is replaced only with `--overwrite` and only after success.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import training
from .models.configuration_moe_bert import MoeBertConfig
from .models.modeling_moe_bert import MoeBertForSequenceClassification
from .models.moe import count_parameters
from .outputs import check_output_dir, staged_output_dir


@dataclass
class DemoConfig:
    """Sizes and lengths of the demo. `quick()` gives a version that runs in well under a minute."""

    output_dir: str = "outputs/demo"
    seed: int = 0
    vocab_size: int = 2000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 64
    pretrain_epochs: float = 40.0
    finetune_epochs: float = 30.0
    num_experts: int = 4
    num_experts_per_tok: int = 2
    lora_r: int = 8
    learning_rate_pretrain: float = 1e-3
    learning_rate_finetune: float = 2e-3
    batch_size: int = 32
    overwrite: bool = False
    verify_hub_folder: bool = True

    def validate(self) -> None:
        """Raise a `ValueError` naming the field (the CLI flag) for every invalid value, before anything is written."""
        flags = {
            "pretrain_epochs": "--pretrain-epochs",
            "finetune_epochs": "--finetune-epochs",
            "num_experts": "--experts",
            "num_experts_per_tok": "--top-k",
        }
        for name in (
            "pretrain_epochs",
            "finetune_epochs",
            "learning_rate_pretrain",
            "learning_rate_finetune",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{flags.get(name, name)} must be a finite number > 0, got {value!r}")
        for name, minimum in (("batch_size", 1), ("lora_r", 1), ("max_length", 8), ("vocab_size", 100)):
            if getattr(self, name) < minimum:
                raise ValueError(f"`{name}` must be >= {minimum}, got {getattr(self, name)!r}")
        if self.num_experts < 2:
            raise ValueError(f"--experts must be >= 2 (a MoE needs several experts), got {self.num_experts}")
        # The MoE fields and the shape are checked by the config classes themselves (one set of rules).
        MoeBertConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_layers=1,
        )

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        base = dict(
            vocab_size=600,
            hidden_size=64,
            num_layers=2,
            intermediate_size=128,
            pretrain_epochs=1.0,
            finetune_epochs=1.0,
        )
        return cls(**{**base, **overrides})


@dataclass
class DemoResult:
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _data_file(name: str) -> Path:
    return Path(str(resources.files("ptmoe") / "data" / name))


def _read_jsonl(name: str) -> list[dict]:
    return [
        json.loads(line) for line in _data_file(name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@contextmanager
def _stage(result: DemoResult, name: str):
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    result.stages[name] = time.perf_counter() - start


def _training_args(config: DemoConfig, out: Path, epochs: float, lr: float) -> TrainingArguments:
    """The Trainer arguments, parsed from flags by `ptmoe.training.parse_arguments` exactly as the scripts do."""
    flags = {
        "output_dir": out,
        "num_train_epochs": epochs,
        "learning_rate": lr,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": 64,
        "warmup_steps": 0.1,  # a float below 1 is a ratio of the training steps
        "weight_decay": 0.01,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": config.seed,
        "use_cpu": True,
        "disable_tqdm": False,
    }
    (arguments,) = training.parse_arguments(
        (TrainingArguments,), [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    )
    return arguments


def _evaluate_classifier(model, dataset, tokenizer, label_mapping: training.LabelMapping) -> dict[str, float]:
    """`ptmoe.training.classification_metrics` (accuracy, F1) of `model` on a tokenised split.

    A plain loop rather than `Trainer.evaluate`, because the Trainer refuses a purely 4-bit model.
    """
    collate = DataCollatorWithPadding(tokenizer)
    to_predictions = training.logits_to_predictions("classification")
    predictions, references = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            batch = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
            references.append(batch.pop("labels"))
            predictions.append(to_predictions(model(**batch).logits, None))
    return training.classification_metrics(label_mapping)(
        EvalPrediction(predictions=torch.cat(predictions).numpy(), label_ids=torch.cat(references).numpy())
    )


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def _finetune_with_lora(model, lora_config, config, tokenizer, train_dataset, out: Path, callbacks=()):
    """Expert/FFN LoRA fine-tuning on the sentiment set; returns the merged full-precision model."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    trainer = Trainer(
        model=peft_model,
        args=_training_args(config, out, config.finetune_epochs, config.learning_rate_finetune),
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=list(callbacks),
    )
    trainer.train()
    return peft_model.merge_and_unload(), trainable / total


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the whole demo; writes everything under `config.output_dir` and returns the measured numbers."""
    config = config or DemoConfig()
    config.validate()
    final_out = check_output_dir(config.output_dir, config.overwrite)  # refuse before any work
    with staged_output_dir(final_out, config.overwrite) as out:
        result = _run_stages(config, out, final_out)
        # Paths in the summary are where the files will be once the folder is in place.
        result.files = {
            name: str(final_out / Path(path).relative_to(out)) for name, path in result.files.items()
        }
        (out / "summary.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    print_summary(result)
    return result


def _run_stages(config: DemoConfig, out: Path, final_out: Path) -> DemoResult:
    """Every stage of the demo, writing under `out` (the staging folder that becomes `final_out`)."""
    import datasets

    from . import bnb_4bit_config, expert_lora_config, upcycle
    from .telemetry import RouterTelemetryCallback

    set_seed(config.seed)
    result = DemoResult()
    corpus = [
        line for line in _data_file("corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    sentiment = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_read_jsonl("sentiment_train.jsonl")),
            "validation": datasets.Dataset.from_list(_read_jsonl("sentiment_test.jsonl")),
        }
    )
    labels = training.build_label_mapping(sentiment, "label")

    with _stage(result, "1. tokenizer (WordPiece on the shipped corpus)"):
        tokenizer = training.train_tokenizer(corpus, config.vocab_size, out / "tokenizer")
        print(f"vocabulary: {len(tokenizer)} tokens")

    with _stage(result, "2. dense BERT: brief MLM pre-training"):
        dense_config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_length,
            pad_token_id=tokenizer.pad_token_id,
        )
        dense_mlm = BertForMaskedLM(dense_config)
        trainer = Trainer(
            model=dense_mlm,
            args=_training_args(
                config, out / "dense-mlm", config.pretrain_epochs, config.learning_rate_pretrain
            ),
            train_dataset=training.tokenize_for_mlm(
                datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": corpus})}),
                tokenizer,
                "text",
                max_seq_length=config.max_length,
                line_by_line=True,
            )["train"],
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        )
        result.metrics["dense MLM loss (last)"] = trainer.train().training_loss
        dense_mlm.save_pretrained(out / "dense-mlm")
        tokenizer.save_pretrained(out / "dense-mlm")

    with _stage(result, "3. upcycle to MoE-BERT (copy)"):
        moe_mlm = upcycle(
            out / "dense-mlm",
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_layers=1,
            method="copy",
            seed=config.seed,
        )
        moe_mlm.config.upcycled_from = str(final_out / "dense-mlm")  # not the staging folder, which goes away
        batch = tokenizer(
            corpus[:16], truncation=True, max_length=config.max_length, padding=True, return_tensors="pt"
        )
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            difference = (moe_mlm(**batch).logits - dense_mlm.eval()(**batch).logits)[real].abs().max().item()
        result.metrics["upcycled vs dense max |Δlogit|"] = difference
        print(f"upcycled MoE reproduces the dense MLM: max |Δlogit| = {difference:.2e}")
        moe_mlm.save_pretrained(out / "moe-mlm")
        tokenizer.save_pretrained(out / "moe-mlm")
        result.params["dense"] = {"total": dense_mlm.num_parameters(), "active": dense_mlm.num_parameters()}
        result.params["MoE"] = count_parameters(moe_mlm)

    sentiment = training.tokenize_classification(
        sentiment, tokenizer, "text", "label", labels, max_seq_length=config.max_length
    )
    telemetry = RouterTelemetryCallback(log_expert_load=False)
    with _stage(result, "4. fine-tune MoE-BERT with LoRA per expert (sentiment)"):
        set_seed(config.seed)
        moe_cls = MoeBertForSequenceClassification.from_pretrained(out / "moe-mlm", **labels.model_kwargs())
        lora = expert_lora_config(moe_cls, r=config.lora_r, alpha=2 * config.lora_r, include_attention=True)
        lora.modules_to_save = sorted(set(lora.modules_to_save or []) | {"classifier", "pooler"})
        moe_merged, share = _finetune_with_lora(
            moe_cls, lora, config, tokenizer, sentiment["train"], out / "moe-finetune", callbacks=[telemetry]
        )
        result.metrics["MoE LoRA trainable share"] = share
        result.metrics["MoE accuracy (fp32)"] = _evaluate_classifier(
            moe_merged, sentiment["validation"], tokenizer, labels
        )["accuracy"]
        moe_merged.save_pretrained(out / "moe-sentiment")
        tokenizer.save_pretrained(out / "moe-sentiment")
        result.files["expert load heatmap"] = str(out / "moe-finetune" / "expert_load.png")

    with _stage(result, "5. fine-tune the dense BERT the same way (LoRA on its FFN + attention)"):
        from peft import LoraConfig

        set_seed(config.seed)
        dense_cls = BertForSequenceClassification.from_pretrained(out / "dense-mlm", **labels.model_kwargs())
        dense_lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            target_modules=r".*\.(intermediate\.dense|output\.dense|attention\.self\.(query|key|value))",
            modules_to_save=["classifier", "pooler"],
        )
        dense_merged, _ = _finetune_with_lora(
            dense_cls, dense_lora, config, tokenizer, sentiment["train"], out / "dense-ft"
        )
        result.metrics["dense accuracy (fp32)"] = _evaluate_classifier(
            dense_merged, sentiment["validation"], tokenizer, labels
        )["accuracy"]

    with _stage(result, "6. reload the fine-tuned MoE in 4-bit NF4 (bitsandbytes)"):
        moe_4bit = MoeBertForSequenceClassification.from_pretrained(
            out / "moe-sentiment", quantization_config=bnb_4bit_config(compute_dtype=torch.float32)
        )
        result.metrics["MoE accuracy (4-bit)"] = _evaluate_classifier(
            moe_4bit, sentiment["validation"], tokenizer, labels
        )["accuracy"]
        result.sizes_mb["MoE fp32 in memory"] = moe_merged.get_memory_footprint() / 2**20
        result.sizes_mb["MoE 4-bit in memory"] = moe_4bit.get_memory_footprint() / 2**20
        result.sizes_mb["MoE fp32 on disk"] = _folder_mb(out / "moe-sentiment")

    if config.verify_hub_folder:
        with _stage(result, "7. Hub-ready folder, verified with trust_remote_code in a fresh process"):
            from hub_upload.prepare import prepare

            report = prepare(out / "moe-sentiment", out / "hub-folder", overwrite=True)
            result.files["hub folder"] = str(report["out_dir"])

    with _stage(result, "8. plots"):
        from .telemetry import plot_expert_load

        if telemetry.totals:
            path = plot_expert_load(
                telemetry.totals, out / "expert_load.png", title="Expert load (fine-tuning)"
            )
            result.files["expert load heatmap"] = str(path)

    return result


def print_summary(result: DemoResult) -> None:
    print("\n" + "=" * 72 + "\nptmoe demo — summary\n" + "=" * 72)
    for name, counts in result.params.items():
        print(
            f"{name + ' parameters':<36} total {counts['total']:>12,}   active/token {counts['active']:>12,}"
        )
    for name, value in result.metrics.items():
        shown = f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
        print(f"{name:<36} {shown:>12}")
    for name, value in result.sizes_mb.items():
        print(f"{name:<36} {value:>10.2f} MB")
    for name, seconds in result.stages.items():
        print(f"{name:<60} {seconds:>7.1f} s")
    for name, path in result.files.items():
        print(f"{name:<36} {path}")
