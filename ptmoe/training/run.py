"""Running: `train_evaluate_save` (train, save once, evaluate, write metrics; router telemetry and offline codecarbon
energy tracking when asked), `save_merged` (the LoRA-merged model), `resolve_do_train_eval` and `setup_logging`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .arguments import ModelArguments

logger = logging.getLogger(__name__)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def train_evaluate_save(
    trainer,
    model_args: ModelArguments,
    do_train: bool = True,
    do_eval: bool = True,
    perplexity: bool = False,
) -> dict:
    """Train, save the final model once, evaluate, and write `all_results.json` (main process only).

    With `codecarbon` in `--report_to`, training energy is tracked offline (`ptmoe.energy`): `train_energy_kwh`,
    `train_emissions_kg_co2e` and `train_energy_duration_s` join the metrics and `energy.json` the output folder.

    The model (or, with LoRA, the adapter) and the tokenizer are written to `args.output_dir` by
    `Trainer.save_model`, which writes on the main process only; with `--merge_lora` the merged model also goes to
    `<output_dir>/merged`. Router telemetry is attached when `--router_telemetry` is on and the model has MoE
    layers. With `mlflow` in `--report_to`, training and evaluation are logged to one MLflow run
    (`ptmoe.telemetry.MoeMLflowCallback`: MoE parameters, router metrics, expert-load PNGs).

    Args:
        trainer (`Trainer`): a configured trainer.
        model_args (`ModelArguments`): for `router_telemetry` and `merge_lora`.
        do_train (`bool`), do_eval (`bool`): the phases to run.
        perplexity (`bool`, defaults to `False`): add `eval_perplexity = exp(eval_loss)` (language modelling).

    Returns:
        `dict` of train and eval metrics.
    """
    from ..telemetry import add_router_telemetry, find_moe_blocks, use_moe_mlflow

    if model_args.router_telemetry and do_train and find_moe_blocks(trainer.model):
        add_router_telemetry(trainer)
    # With --report_to mlflow the evaluation below belongs to the training run: keep it open until the end.
    mlflow = use_moe_mlflow(trainer)
    if mlflow is not None:
        mlflow.end_run_on_train_end = False
    try:
        metrics = _train_and_evaluate(trainer, model_args, do_train, do_eval, perplexity)
    finally:
        if mlflow is not None:
            mlflow.end_run()
    if do_train and model_args.merge_lora:
        save_merged(trainer)
    args = trainer.args
    # One line per process (logging is quiet on replicas): shows that every rank of a distributed run finished.
    print(f"ptmoe: process {args.process_index + 1}/{args.world_size} finished", flush=True)
    return metrics


def _train_and_evaluate(
    trainer, model_args: ModelArguments, do_train: bool, do_eval: bool, perplexity: bool
) -> dict:
    """The body of `train_evaluate_save`: train (with energy tracking), save, evaluate, write the metrics."""
    from ..energy import use_offline_codecarbon, write_energy_report

    energy = use_offline_codecarbon(
        trainer,
        getattr(model_args, "energy_country_iso_code", None),
        getattr(model_args, "energy_region", None),
    )
    metrics: dict[str, Any] = {}
    if do_train:
        result = trainer.train()
        train_metrics = dict(result.metrics)
        train_metrics["train_samples"] = len(trainer.train_dataset)
        if energy is not None and energy.report is not None:  # kWh, kg CO2e, seconds (main process)
            train_metrics.update(energy.report.metrics("train"))
            if trainer.is_world_process_zero():
                Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
                write_energy_report(energy.report, Path(trainer.args.output_dir) / "energy.json")
        trainer.save_model()  # the final model (or adapter) + tokenizer, on the main process only
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if do_eval and trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(trainer.eval_dataset)
        if perplexity and "eval_loss" in eval_metrics:
            eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def save_merged(trainer) -> Path | None:
    """Save the LoRA-merged model (+ tokenizer) to `<output_dir>/merged` on the main process (LoRA only)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        logger.warning("--merge_lora ignored: the model has no LoRA adapter (--tuning full).")
        return None
    if getattr(model.base_model.model, "is_loaded_in_4bit", False):
        logger.warning(
            "--merge_lora ignored for QLoRA: merging into 4-bit weights loses precision. Load the base checkpoint "
            "in full precision, `PeftModel.from_pretrained(base, adapter).merge_and_unload()`, then save."
        )
        return None
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    merged_dir = Path(trainer.args.output_dir) / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(merged_dir)
    return merged_dir


def resolve_do_train_eval(training_args) -> tuple[bool, bool]:
    """Both when neither `--do_train` nor `--do_eval` is given; otherwise what was asked."""
    if not training_args.do_train and not training_args.do_eval:
        return True, True
    return bool(training_args.do_train), bool(training_args.do_eval)


def setup_logging(training_args) -> None:
    """Log ptmoe's messages at INFO on the main process; transformers and datasets keep their verbosity.

    `--log_level` / `--log_level_replica` set the level of all three (replicas stay at WARNING by default, as in
    the Trainer).
    """
    import datasets
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("ptmoe").setLevel(min(level, logging.INFO) if training_args.should_log else level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
