"""Layer-wise knowledge distillation from a dense teacher into a (sparse) student of the same shape.

MoEBERT (Zuo et al., NAACL 2022, §3.3) recovers a sparsified BERT by distilling its dense source layer by layer:

    loss = hidden_weight · mean_l MSE(h_l^student, h_l^teacher)          every layer's hidden states (real tokens)
         + output_weight · T² · KL(softmax(z^teacher / T) ‖ softmax(z^student / T))   when both have logits
                           (MSE of the last hidden state otherwise, e.g. sentence-embedding models)

`distill` runs it with the transformers `Trainer` on unlabeled text (progress bar, seeding, LoRA per expert: pass
a PEFT model as the student and only its adapters train).
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import TokenizedTexts, batches, load_texts, model_inputs, resolve_tokenizer


def _hidden_size(config) -> int | None:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose hidden size, vocabulary or depth differs from the student's (layer-wise loss)."""
    s, t = student.config, teacher.config
    if _hidden_size(s) != _hidden_size(t):
        raise ValueError(
            f"the teacher's hidden size ({_hidden_size(t)}) differs from the student's ({_hidden_size(s)}): layer-wise "
            "distillation needs the dense model the student was split from (same hidden size)"
        )
    if getattr(s, "vocab_size", None) != getattr(t, "vocab_size", None):
        raise ValueError(
            f"the teacher's vocabulary ({getattr(t, 'vocab_size', None)} tokens) differs from the student's "
            f"({getattr(s, 'vocab_size', None)}): both must read the same tokenizer"
        )
    for field in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
        if getattr(s, field, None) != getattr(t, field, None):
            raise ValueError(
                f"the teacher has {field}={getattr(t, field, None)}, the student {getattr(s, field, None)}: "
                "layer-wise distillation pairs layer l with layer l"
            )


def _hidden_states(output) -> list[torch.Tensor]:
    if getattr(output, "hidden_states", None) is not None:
        return list(output.hidden_states)
    return list(getattr(output, "encoder_hidden_states", None) or ()) + list(
        getattr(output, "decoder_hidden_states", None) or ()
    )


def distillation_loss(
    student_output,
    teacher_output,
    attention_mask: torch.Tensor,
    hidden_weight: float = 1.0,
    output_weight: float = 1.0,
    temperature: float = 2.0,
    decoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of the module docstring (a pure function of two model outputs with `output_hidden_states=True`).

    Args:
        student_output, teacher_output: model outputs with hidden states (and `logits` for the output term).
        attention_mask (`torch.Tensor` of shape `(B, S)`): real tokens of the (encoder) input.
        decoder_attention_mask (`torch.Tensor` of shape `(B, S_dec)`, *optional*): real decoder tokens (T5).
    """
    student_hidden, teacher_hidden = _hidden_states(student_output), _hidden_states(teacher_output)
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
    losses = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        mask = attention_mask if s.shape[1] == attention_mask.shape[1] else decoder_attention_mask
        mask = mask.bool() if mask is not None else torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        losses.append(F.mse_loss(s[mask].float(), t[mask].float()))
    loss = hidden_weight * torch.stack(losses).mean()
    s_logits, t_logits = getattr(student_output, "logits", None), getattr(teacher_output, "logits", None)
    if output_weight:
        if s_logits is not None and t_logits is not None:
            mask = attention_mask if s_logits.shape[1] == attention_mask.shape[1] else decoder_attention_mask
            mask = mask.bool() if mask is not None else torch.ones(s_logits.shape[:2], dtype=torch.bool)
            log_p_student = F.log_softmax(s_logits[mask].float() / temperature, dim=-1)
            p_teacher = F.softmax(t_logits[mask].float() / temperature, dim=-1)
            loss = loss + output_weight * temperature**2 * F.kl_div(
                log_p_student, p_teacher, reduction="batchmean"
            )
        else:
            mask = attention_mask.bool()
            loss = loss + output_weight * F.mse_loss(
                student_hidden[-1][mask].float(), teacher_hidden[-1][mask].float()
            )
    return loss


def _forward(model, batch: dict, output_router_losses: bool | None = None):
    # The decoder's padding is masked too: the distillation loss compares the decoder's real tokens.
    return model(**model_inputs(model, batch, decoder_attention_mask=True), output_hidden_states=True)


@torch.no_grad()
def student_teacher_gap(
    student: nn.Module,
    teacher: nn.Module,
    data,
    tokenizer=None,
    batch_size: int = 16,
    max_length: int = 128,
    **loss_kwargs,
) -> float:
    """Mean `distillation_loss` of the student against the teacher on `data` (eval mode; lower = closer)."""
    texts = load_texts(data)
    tokenizer = resolve_tokenizer(student, tokenizer)
    device = next(student.parameters()).device
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    for batch in batches(texts, tokenizer, batch_size, max_length, device):
        loss = distillation_loss(
            _forward(student, batch),
            _forward(teacher, batch),
            batch["attention_mask"],
            decoder_attention_mask=batch["attention_mask"],
            **loss_kwargs,
        )
        total += float(loss) * batch["input_ids"].shape[0]
        count += batch["input_ids"].shape[0]
    student.train(modes[0])
    teacher.train(modes[1])
    return total / count


def distillation_trainer(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    tokenizer,
    training_args,
    hidden_weight: float = 1.0,
    output_weight: float = 1.0,
    temperature: float = 2.0,
    keep_dropout: bool = False,
):
    """A transformers `Trainer` whose loss is `distillation_loss` against the frozen `teacher` (used by `distill` and
    `scripts/distill.py`)."""
    from transformers import DataCollatorWithPadding, Trainer

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not keep_dropout:
                # The target is a deterministic function of the input: dropout noise would dominate the small
                # student-teacher gap (eval mode changes no gradient path).
                model.eval()
            batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            with torch.no_grad():
                teacher_output = _forward(teacher, batch)
            student_output = _forward(model, batch)
            loss = distillation_loss(
                student_output,
                teacher_output,
                batch["attention_mask"],
                hidden_weight,
                output_weight,
                temperature,
                decoder_attention_mask=batch["attention_mask"],
            )
            return (loss, student_output) if return_outputs else loss

    teacher.eval().requires_grad_(False)
    return DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data,
    *,
    steps: int = 200,
    tokenizer=None,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    max_length: int = 128,
    hidden_weight: float = 1.0,
    output_weight: float = 1.0,
    temperature: float = 2.0,
    train_routers: bool = False,
    keep_dropout: bool = False,
    seed: int = 0,
    text_column: str = "text",
    progress: bool = True,
    output_dir: str | None = None,
) -> dict[str, float]:
    """Distil `teacher` into `student` on unlabeled text (layer-wise hidden states + output; see the module docstring).

    Args:
        student: the model to train (a ptmoe MoE model, or a PEFT model around one: then only its adapters train).
        teacher: the dense model it was split from (same hidden size, vocabulary and depth); frozen.
        data: a list of texts, a `datasets.Dataset` (column `text_column`) or a text file.
        steps (`int`, defaults to 200): optimisation steps.
        tokenizer (*optional*): a tokenizer or its path (default: the one saved beside the student).
        learning_rate, batch_size, max_length, seed: training settings.
        hidden_weight / output_weight / temperature: the loss terms.
        train_routers (`bool`, defaults to `False`): also train the routers (fitted routers stay fixed by default,
            as in MoEfication; with `combine_weights="ones"` they get no gradient anyway).
        keep_dropout (`bool`, defaults to `False`): train the student with its dropout on (off by default: the
            target is deterministic, and dropout noise swamps a small student-teacher gap).
        progress (`bool`): the Trainer's progress bar.
        output_dir (`str`, *optional*): Trainer output folder (a temporary one by default; nothing is saved).

    Returns:
        `{"train_loss": …, "train_runtime": …}` from the Trainer.

    Raises:
        `ValueError` for a teacher of another shape, empty data or `steps < 1`.
    """
    from transformers import TrainingArguments

    check_teacher(student, teacher)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    texts = load_texts(data, text_column)
    tokenizer = resolve_tokenizer(student, tokenizer)
    is_peft = hasattr(student, "peft_config")
    if not is_peft:
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(train_routers or ".router." not in f".{name}")
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            data_seed=seed,
            report_to=[],
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            logging_strategy="steps" if progress else "no",
            disable_tqdm=not progress,
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = distillation_trainer(
            student,
            teacher,
            TokenizedTexts(texts, tokenizer, max_length),
            tokenizer,
            args,
            hidden_weight,
            output_weight,
            temperature,
            keep_dropout,
        )
        result = trainer.train()
    student.eval()
    return {
        "train_loss": float(result.training_loss),
        "train_runtime": float(result.metrics["train_runtime"]),
    }
