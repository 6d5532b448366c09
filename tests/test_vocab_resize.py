"""Hash routers follow the vocabulary (resize, save/reload, loading into another vocab_size), and checkpoint shape
mismatches keep transformers' exception contract (`except RuntimeError` catches them)."""

from __future__ import annotations

import pytest
import torch

import ptmoe
from conftest import TINY_BERT
from ptmoe.auto import REGISTRY
from ptmoe.models.moe import CheckpointMismatchError, HashRouter

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = TINY_BERT["vocab_size"]
BERT = {**TINY_BERT, "num_experts_per_tok": 1}
T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    num_experts=4,
    num_experts_per_tok=1,
    encoder_moe_layers=[0, 1],
    decoder_moe_layers=[1],
)
MODEL_CLASSES = [model_class for _, models in REGISTRY for _, model_class in models]


def hash_model(model_class, **overrides):
    """A tiny model of `model_class` whose every MoE layer routes by hash."""
    fields = BERT if model_class.config_class is ptmoe.MoeBertConfig else T5
    torch.manual_seed(0)
    return model_class(model_class.config_class(**{**fields, "router_type": "hash", **overrides})).eval()


def hash_tables(model) -> list[torch.Tensor]:
    tables = [m.hash_table for m in model.modules() if isinstance(m, HashRouter)]
    assert tables, "the model has no hash router"
    return tables


def model_inputs(model, input_ids: torch.Tensor) -> dict:
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if hasattr(model, "decoder"):  # the encoder-decoder models
        inputs["decoder_input_ids"] = input_ids[:, :3]
    return inputs


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_resize_grows_every_hash_table_keeping_old_assignments(model_class):
    model = hash_model(model_class)
    before = [table.clone() for table in hash_tables(model)]
    model.resize_token_embeddings(VOCAB + 21)
    assert model.config.vocab_size == VOCAB + 21
    for old, new in zip(before, hash_tables(model), strict=True):
        assert new.shape == (VOCAB + 21,) and new.dtype == old.dtype
        assert torch.equal(new[:VOCAB], old)  # existing ids keep their experts
        # new ids are spread over the experts as evenly as the old ones (21 ids over 4 experts: 5 or 6 each)
        counts = torch.bincount(new[VOCAB:], minlength=4)
        assert counts.max() - counts.min() <= 1
    # ... and deterministically: another model resized the same way (another global RNG state) agrees
    torch.manual_seed(123)
    other = hash_model(model_class)
    other.resize_token_embeddings(VOCAB + 21)
    for a, b in zip(hash_tables(model), hash_tables(other), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_resized_model_routes_new_ids_and_reloads(model_class, tmp_path):
    model = hash_model(model_class)
    model.resize_token_embeddings(VOCAB + 21)
    input_ids = torch.tensor([[3, VOCAB, VOCAB + 5, VOCAB + 20, 7, 8]])  # new ids used to raise IndexError
    with torch.no_grad():
        expected = model(**model_inputs(model, input_ids), output_router_logits=True)
    router_logits = expected.encoder_router_logits if hasattr(model, "decoder") else expected.router_logits
    routed = router_logits[0].argmax(-1)  # (B, S): a hash router puts all probability on its expert
    assert torch.equal(routed, hash_tables(model)[0][input_ids])
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()  # used to be refused: the table kept the old size
    assert reloaded.config.vocab_size == VOCAB + 21
    for a, b in zip(hash_tables(model), hash_tables(reloaded), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        got = reloaded(**model_inputs(reloaded, input_ids))
    first = next(iter(expected.values()))
    torch.testing.assert_close(next(iter(got.values())), first)


def test_resize_shrinks_hash_tables():
    model = hash_model(ptmoe.MoeBertForMaskedLM)
    before = hash_tables(model)[0].clone()
    model.resize_token_embeddings(64)
    assert all(torch.equal(table, before[:64]) for table in hash_tables(model))


def test_resize_pads_hash_tables_to_the_embedding_size():
    model = hash_model(ptmoe.MoeBertModel)
    embeddings = model.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=8)
    assert embeddings.weight.shape[0] == 104
    assert all(table.shape == (104,) for table in hash_tables(model))


def test_t5_generate_accepts_and_emits_new_ids():
    model = hash_model(ptmoe.MoeT5ForConditionalGeneration)
    model.resize_token_embeddings(VOCAB + 21)
    input_ids = torch.tensor([[VOCAB + 1, 5, VOCAB + 19, 6]])
    # Old ids suppressed: every generated token is a new id, fed back through the decoder's hash router.
    generated = model.generate(
        input_ids, max_new_tokens=4, do_sample=False, suppress_tokens=list(range(VOCAB))
    )
    assert generated.shape == (1, 5) and (generated[:, 1:] >= VOCAB).all()


@pytest.mark.parametrize(
    "model_class", [ptmoe.MoeBertForMaskedLM, ptmoe.MoeT5ForConditionalGeneration], ids=lambda c: c.__name__
)
def test_load_into_another_vocab_size_rebuilds_the_hash_table(model_class, tmp_path):
    hash_model(model_class).save_pretrained(tmp_path)
    model = model_class.from_pretrained(tmp_path, vocab_size=VOCAB + 21, ignore_mismatched_sizes=True).eval()
    for table in hash_tables(model):
        # rebuilt by the seeded rule for the new size, as a new model of that vocabulary would have it
        assert torch.equal(table, HashRouter.build_table(VOCAB + 21, 4))
    input_ids = torch.tensor([[VOCAB + 20, 3, 4]])
    with torch.no_grad():
        model(**model_inputs(model, input_ids))
    # Without `ignore_mismatched_sizes` the message is the one about shapes (a vocabulary matter), not MoE layers.
    with pytest.raises(CheckpointMismatchError, match="ignore_mismatched_sizes") as error:
        model_class.from_pretrained(tmp_path, vocab_size=VOCAB + 21)
    assert "MoE layers" not in str(error.value)


# --------------------------------------------------------------------------------------------------------------
# Shape mismatches keep transformers' exception contract
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    config = ptmoe.MoeBertConfig(**{**BERT, "num_experts_per_tok": 2}, num_labels=3)
    ptmoe.MoeBertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_labels": 5}, "other shapes than the model"),  # a task head of another size
        ({"num_experts": 8}, "MoE layers do not match the model config"),  # experts/routers of another size
    ],
    ids=["head", "experts"],
)
def test_shape_mismatch_is_a_runtime_error_with_ptmoe_message(classifier_folder, overrides, message):
    try:  # code written against transformers catches a size mismatch as a RuntimeError
        ptmoe.MoeBertForSequenceClassification.from_pretrained(classifier_folder, **overrides)
    except RuntimeError as error:
        assert isinstance(error, ValueError)  # ptmoe's bad-input type: the CLI prints it as one line
        assert message in str(error)
    else:
        pytest.fail("a checkpoint of other shapes was loaded")
    model = ptmoe.MoeBertForSequenceClassification.from_pretrained(
        classifier_folder, num_labels=5, ignore_mismatched_sizes=True
    )
    assert model.classifier.out_features == 5


def test_from_pretrained_without_checkpoint_initialises_every_weight():
    """`from_pretrained(None, config=..., state_dict={})` (transformers' fresh-init idiom) used to fail formatting
    `None` as a path; found by transformers' `test_can_init_all_missing_weights`."""
    config = ptmoe.MoeBertConfig(**{**BERT, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = ptmoe.MoeBertModel.from_pretrained(None, config=config, state_dict={})
    assert not any(p.device.type == "meta" for p in model.parameters())
    router = model.encoder.layer[1].moe.router.weight
    assert router.std() > 0  # initialised by `_init_weights`, not left empty
    # A non-empty state dict without experts is still refused, naming it as the `state_dict`.
    dense = {k: v for k, v in model.state_dict().items() if ".moe." not in k}
    with pytest.raises(ValueError, match="the `state_dict` has no expert or router weights"):
        ptmoe.MoeBertModel.from_pretrained(None, config=config, state_dict=dense)
