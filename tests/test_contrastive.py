"""ptmoe.evaluation.retrieval and ptmoe.evaluation.contrastive: metrics against hand-computed ranks, the loss against
its definition, schedules without repeated pairs, and a tiny encoder that learns half-sentence retrieval."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from ptmoe.evaluation.contrastive import contrastive_loss, pair_schedule, train_contrastive
from ptmoe.evaluation.retrieval import half_sentence_retrieval, mean_pool, retrieval_scores, split_halves


def test_retrieval_scores_match_hand_ranks():
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    # query 0 -> its doc first; query 1 -> its doc ranks 2nd; query 2 -> tie with doc 0 counts against it (rank 2)
    documents = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.9], [1.0, 0.1]]), dim=-1)
    ranks = []
    for i in range(3):
        scores = queries[i] @ documents.T
        ranks.append(int((scores >= scores[i]).sum()))
    got = retrieval_scores(queries, documents)
    assert got["recall@1"] == pytest.approx(sum(r == 1 for r in ranks) / 3)
    assert got["mrr"] == pytest.approx(sum(1 / r for r in ranks) / 3)
    collapsed = torch.ones(4, 2) / math.sqrt(2)
    assert retrieval_scores(collapsed, collapsed) == {"recall@1": 0.0, "mrr": pytest.approx(0.25)}


def test_split_halves_and_mean_pool():
    assert split_halves(["a b c d e"]) == (["a b"], ["c d e"])
    with pytest.raises(ValueError, match=">= 2 words"):
        split_halves(["sozinha"])
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]), normalize=False)
    assert torch.allclose(pooled, torch.tensor([[2.0, 2.0]]))  # padding ignored


def test_contrastive_loss_is_symmetric_cross_entropy():
    torch.manual_seed(0)
    q, d = (torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    logits = 20.0 * q @ d.T
    expected = -0.5 * (logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean())
    assert contrastive_loss(q, d).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pair_schedule_has_no_repeated_pair_in_a_batch():
    schedule = pair_schedule(10, 7, 4, seed=0)
    assert schedule.shape == (7, 4)
    assert all(len(set(row.tolist())) == 4 for row in schedule)
    assert torch.equal(schedule, pair_schedule(10, 7, 4, seed=0))
    with pytest.raises(ValueError, match="batch"):
        pair_schedule(3, 1, 4, seed=0)


class _WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (ids from 1; 0 = padding), enough for the encoder call."""

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(sorted(set(words)))}

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        rows = [[self.ids[w] for w in t.split()][:max_length] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": ids.ne(0).long()}


def test_tiny_encoder_learns_half_sentence_retrieval():
    torch.manual_seed(0)
    words = [f"w{i}" for i in range(60)]
    sentences = [" ".join(words[(7 * i + j) % 60] for j in range(6)) for i in range(40)]
    tokenizer = _WordTokenizer(words)
    model = BertModel(BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip
    before = half_sentence_retrieval(model, tokenizer, sentences, groups=["a"] * 20 + ["b"] * 20)
    first, second = split_halves(sentences)
    result = train_contrastive(model, tokenizer, first, second, pair_schedule(40, 60, 8, 0), 3e-3)
    after = half_sentence_retrieval(model, tokenizer, sentences, groups=["a"] * 20 + ["b"] * 20)
    assert result["steps"] == 60 and result["losses"][-1] < result["losses"][0]
    assert after[None]["mrr"] > before[None]["mrr"] + 0.2 and set(after) == {None, "a", "b"}
