"""The model zoo registry (ptmoe/zoo.py): explicit entries, list/create, upcycling on the fly with a cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

import ptmoe
from ptmoe import zoo
from ptmoe.cards import HUB_LICENSES
from ptmoe.cli import main as ptmoe_main

# Tiny shapes per family (DESIGN.md: hidden 32, 2 layers, 4 heads, vocab 99); experts stay as registered.
TINY = {
    "moe_bert": dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    ),
    "moe_t5": dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4
    ),
}


def tiny_overrides(name: str) -> dict:
    return TINY[zoo.get_model_info(name).family]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    """Tiny dense checkpoints of both families, saved locally (the `source=` of the offline tests)."""
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(**TINY["moe_bert"]))
    bert.save_pretrained(root / "bert")
    t5 = T5ForConditionalGeneration(
        T5Config(**TINY["moe_t5"], feed_forward_proj="relu", decoder_start_token_id=0)
    )
    t5.save_pretrained(root / "t5")
    return {"moe_bert": root / "bert", "moe_t5": root / "t5"}


# ---------------------------------------------------------------------------------------------------- registry


def test_list_models_is_sorted_and_covers_every_base_and_flavour():
    names = ptmoe.list_models()
    assert names == sorted(names)
    sources = {zoo.get_model_info(n).dense_source for n in names}
    assert sources == {
        "neuralmind/bert-base-portuguese-cased",
        "neuralmind/bert-large-portuguese-cased",
        "unicamp-dl/ptt5-base-portuguese-vocab",
        "unicamp-dl/ptt5-v2-base",
    }
    for source in sources:
        flavours = {
            (e.router_type, e.num_experts_per_tok)
            for e in map(zoo.get_model_info, names)
            if e.dense_source == source and e.num_experts == 8
        }
        assert flavours == {("topk", 2), ("switch", 1)}, source


def test_list_models_filters_with_a_shell_pattern():
    assert ptmoe.list_models("*switch-16e") == [
        "moe-bertimbau-base-switch-16e",
        "moe-ptt5-base-switch-16e",
        "moe-ptt5-v2-base-switch-16e",
    ]
    assert ptmoe.list_models("MOE-PTT5-V2-*") == ptmoe.list_models("moe-ptt5-v2-*")
    assert ptmoe.list_models("no-such-model*") == []


def test_unknown_name_lists_close_matches():
    with pytest.raises(zoo.UnknownModelError, match="Did you mean: moe-bertimbau-base-top2-8e"):
        ptmoe.create_model("moe-bertimbau-base-top2")


@pytest.mark.parametrize("name", zoo.list_models())
def test_entry_records_provenance_as_literal_data(name):
    entry = ptmoe.get_model_info(name)
    assert entry.dense_license in HUB_LICENSES and entry.dense_license != "other"
    assert entry.tokenizer == entry.dense_source
    assert (
        entry.hub_id is None and "published" in entry.notes
    )  # nothing is published yet, and the entry says so
    assert "re-check" in entry.notes  # licenses are to be re-checked on the Hub page before publishing
    assert entry.upcycling_method in ptmoe.UPCYCLING_METHODS
    assert entry.router_type in ptmoe.ROUTER_TYPES
    assert entry.num_experts_per_tok == (1 if entry.router_type == "switch" else 2)
    assert entry.datasets and entry.description and entry.citations
    shape_keys = {"moe_bert": "hidden_size", "moe_t5": "d_model"}[entry.family]
    assert isinstance(entry.dense_config[shape_keys], int)


def test_entries_are_immutable():
    entry = ptmoe.get_model_info("moe-bertimbau-base-top2-8e")
    with pytest.raises(TypeError):
        entry.dense_config["hidden_size"] = 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.num_experts = 2


@pytest.mark.parametrize("name", zoo.list_models())
def test_full_size_config_has_the_registered_shape(name):
    entry = ptmoe.get_model_info(name)
    config = zoo.create_config(name)
    for key, value in entry.dense_config.items():
        assert getattr(config, key) == value, key
    assert config.num_experts == entry.num_experts
    assert config.router_type == entry.router_type
    assert config.architectures == [entry.architecture]


@pytest.mark.parametrize("name", zoo.list_models())
def test_full_size_counts_on_meta_device(name):
    """Counts of the full-size model without allocating it; checked against the MoE arithmetic."""
    entry = ptmoe.get_model_info(name)
    config = zoo.create_config(name)
    counts = zoo.parameter_counts(name)
    is_t5 = entry.family == "moe_t5"
    hidden, ffn = (config.d_model, config.d_ff) if is_t5 else (config.hidden_size, config.intermediate_size)
    moe_layers = (
        len(config.encoder_moe_layer_indices) + len(config.decoder_moe_layer_indices)
        if is_t5
        else len(config.moe_layer_indices)
    )
    expert = 2 * hidden * ffn + (0 if is_t5 else ffn + hidden)  # wi + wo (+ biases in BERT)
    router = entry.num_experts * hidden
    k, e = entry.num_experts_per_tok, entry.num_experts
    assert counts["active"] == counts["dense"] + moe_layers * (router + (k - 1) * expert)
    assert counts["total"] == counts["dense"] + moe_layers * (router + (e - 1) * expert)
    if entry.dense_source == "unicamp-dl/ptt5-v2-base":
        assert counts["dense"] == 222_903_552  # the trainable-parameter count reported for ptt5-v2-base


# ---------------------------------------------------------------------------------------------------- pretrained=False


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_entry_builds_tiny_and_trains(name):
    entry = ptmoe.get_model_info(name)
    torch.manual_seed(0)
    model = ptmoe.create_model(name, **tiny_overrides(name))
    assert type(model).__name__ == entry.architecture
    assert model.config.num_experts == entry.num_experts
    ids = torch.randint(0, 99, (2, 8))
    if entry.family == "moe_t5":
        outputs = model(input_ids=ids, labels=torch.randint(0, 99, (2, 5)))
    else:
        outputs = model(input_ids=ids, labels=ids)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    routers = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert routers and all(p.grad is not None for p in routers)


def test_pretrained_false_refuses_a_source(tmp_path):
    with pytest.raises(ValueError, match="only applies with `pretrained=True`"):
        ptmoe.create_model("moe-bertimbau-base-top2-8e", source=tmp_path)


# ---------------------------------------------------------------------------------------------------- pretrained=True


def _reference_upcycle(entry, source):
    """`ptmoe.upcycle` called directly with the entry's recorded recipe."""
    return ptmoe.upcycle(
        str(source),
        num_experts=entry.num_experts,
        num_experts_per_tok=entry.num_experts_per_tok,
        router_type=entry.router_type,
        method=entry.upcycling_method,
        seed=entry.upcycling_seed,
        progress=False,
        **entry.moe_layers,
        **entry.router_config,
    )


@pytest.mark.parametrize("name", ["moe-bertimbau-base-top2-8e", "moe-ptt5-v2-base-switch-8e"])
def test_pretrained_with_local_source_matches_upcycle(name, dense_dirs, cache):
    entry = ptmoe.get_model_info(name)
    source = dense_dirs[entry.family]
    model = ptmoe.create_model(name, pretrained=True, source=source)
    reference = _reference_upcycle(entry, source)
    assert type(model) is type(reference)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)
    assert model.config.upcycling_method == entry.upcycling_method
    assert model.config.upcycled_from == str(source)


def test_pretrained_loads_from_the_cache_the_second_time(dense_dirs, cache, monkeypatch):
    name = "moe-bertimbau-base-switch-8e"
    first = ptmoe.create_model(name, pretrained=True, source=dense_dirs["moe_bert"])
    (folder,) = cache.iterdir()
    assert folder.name == zoo.cache_key(name, str(dense_dirs["moe_bert"]))
    assert (folder / "model.safetensors").is_file() and (folder / "ptmoe_zoo.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("upcycle must not run again: the result is cached")

    monkeypatch.setattr("ptmoe.upcycling.upcycle", fail)
    second = ptmoe.create_model(name, pretrained=True, source=dense_dirs["moe_bert"])
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_cache_key_depends_on_source_and_settings(dense_dirs, tmp_path):
    name = "moe-bertimbau-base-top2-8e"
    key = zoo.cache_key(name, str(dense_dirs["moe_bert"]))
    assert key.startswith(f"{name}-")
    assert zoo.cache_key(name, str(dense_dirs["moe_bert"])) == key
    assert zoo.cache_key(name, str(dense_dirs["moe_bert"]), router_jitter_noise=0.1) != key
    assert zoo.cache_key(name, str(dense_dirs["moe_t5"])) != key
    assert zoo.cache_key(name) != key  # the Hub id


def test_cache_dir_respects_ptmoe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PTMOE_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    monkeypatch.delenv("PTMOE_CACHE")
    assert zoo.cache_dir() == zoo.Path.home() / ".cache" / "ptmoe"


def test_published_entry_loads_its_checkpoint(tmp_path, cache, monkeypatch):
    """An entry with `hub_id` loads that checkpoint (a local folder stands in for the Hub id)."""
    name = "moe-bertimbau-base-top2-8e"
    torch.manual_seed(1)
    published = ptmoe.create_model(name, **tiny_overrides(name))
    published.save_pretrained(tmp_path / "published")
    entry = dataclasses.replace(ptmoe.get_model_info(name), hub_id=str(tmp_path / "published"))
    monkeypatch.setattr(
        "ptmoe.upcycling.upcycle", lambda *a, **k: pytest.fail("a published entry is not upcycled")
    )
    loaded = ptmoe.create_model(entry, pretrained=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(published.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_cli_list_prints_the_table(capsys):
    assert ptmoe_main(["list", "moe-ptt5-v2-*", "--no-counts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "architecture", "dense"]
    assert [line.split()[0] for line in lines[2:]] == ptmoe.list_models("moe-ptt5-v2-*")
    assert "apache-2.0" in lines[2]


def test_cli_list_with_counts(capsys):
    assert ptmoe_main(["list", "moe-bertimbau-base-top2-8e"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    counts = zoo.parameter_counts("moe-bertimbau-base-top2-8e")
    assert f"{counts['total'] / 1e6:,.0f}M" in row and f"{counts['active'] / 1e6:,.0f}M" in row
