"""`transformers.pipeline()` on ptmoe folders: fill-mask, text-classification, token-classification and
feature-extraction, with ptmoe imported and with `trust_remote_code=True` in a process without ptmoe; results are
checked against the model's own outputs. (transformers 5 removed the question-answering and text2text-generation
pipelines: those models are used through `model(...)` / `model.generate(...)`, tested in test_moe_bert.py and
test_moe_t5.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from test_training import make_bert_tokenizer
from transformers import pipeline

import ptmoe
from conftest import TINY_BERT, run_without_ptmoe

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "o gato dorme no sofá em Lisboa"
TASKS = {
    "fill-mask": (ptmoe.MoeBertForMaskedLM, {}, "o gato [MASK] no sofá"),
    "text-classification": (
        ptmoe.MoeBertForSequenceClassification,
        dict(num_labels=2, id2label={0: "negativo", 1: "positivo"}, label2id={"negativo": 0, "positivo": 1}),
        TEXT,
    ),
    "token-classification": (ptmoe.MoeBertForTokenClassification, dict(num_labels=3), TEXT),
    "feature-extraction": (ptmoe.MoeBertModel, {}, TEXT),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny saved model + tokenizer per task."""
    root = tmp_path_factory.mktemp("pipelines")
    tokenizer = make_bert_tokenizer()
    paths = {}
    for task, (model_class, extra, _) in TASKS.items():
        torch.manual_seed(0)
        model = model_class(
            ptmoe.MoeBertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer)}, **extra)
        ).eval()
        model.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        paths[task] = root / task
    return paths


def _logits(folder, model_class, text):
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(folder).eval()
    encoded = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded)
    return encoded, (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0]


def _plain(result):
    """Pipeline output as JSON-able Python (numpy scalars become floats)."""
    return json.loads(json.dumps(result, default=float))


@pytest.mark.parametrize("task", list(TASKS))
def test_pipeline_matches_the_model(folders, task):
    model_class, _, text = TASKS[task]
    result = pipeline(task, model=str(folders[task]), device="cpu")(text)
    encoded, logits = _logits(folders[task], model_class, text)
    if task == "fill-mask":
        mask = encoded["input_ids"][0].tolist().index(pipeline_tokenizer_mask_id(folders[task]))
        probs = logits[mask].softmax(-1)
        assert result[0]["token"] == int(probs.argmax())
        assert result[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    elif task == "text-classification":
        probs = logits.softmax(-1)
        assert result[0]["label"] == ["negativo", "positivo"][int(probs.argmax())]
        assert result[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    elif task == "token-classification":
        labels = logits.argmax(-1)[1:-1]  # without [CLS] / [SEP]
        assert [r["entity"] for r in result] == [f"LABEL_{int(i)}" for i in labels]
    else:
        torch.testing.assert_close(torch.tensor(result[0]), logits, atol=1e-5, rtol=1e-5)


def pipeline_tokenizer_mask_id(folder) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).mask_token_id


def test_pipelines_with_trust_remote_code_without_ptmoe(folders, tmp_path):
    expected = {
        task: _plain(pipeline(task, model=str(folders[task]), device="cpu")(text))
        for task, (_, _, text) in TASKS.items()
    }
    inputs = {task: (str(folders[task]), text) for task, (_, _, text) in TASKS.items()}
    run_without_ptmoe(
        f"""
        import json
        from transformers import pipeline
        results = {{}}
        for task, (folder, text) in {inputs!r}.items():
            pipe = pipeline(task, model=folder, device="cpu", trust_remote_code=True)
            assert "ptmoe" not in type(pipe.model).__module__, type(pipe.model).__module__
            results[task] = pipe(text)
        json.dump(results, open("results.json", "w"), default=float)
        """,
        tmp_path,
    )
    got = json.loads((tmp_path / "results.json").read_text())
    for task in TASKS:
        if task == "feature-extraction":
            torch.testing.assert_close(
                torch.tensor(got[task]), torch.tensor(expected[task]), atol=1e-5, rtol=1e-5
            )
            continue
        for g, e in zip(got[task], expected[task], strict=True):
            assert {k: v for k, v in g.items() if k != "score"} == {
                k: v for k, v in e.items() if k != "score"
            }
            assert g["score"] == pytest.approx(e["score"], abs=1e-5)
