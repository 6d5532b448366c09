"""hub_upload: prepare → verify (fresh process without ptmoe) → push (against a recording stand-in for HfApi)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer

import ptmoe
from conftest import MOE_PARTS
from hub_upload import (
    STAMP_NAME,
    HubUploadError,
    build_folder,
    check_verified,
    prepare,
    push,
    verify_folder,
)
from hub_upload.__main__ import main as hub_upload_main
from ptmoe.cards import validate_card

TOKEN = "hf_FAKEtoken0123456789abcdefDoNotLeak"
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_experts=4,
    moe_layers=[1],
)
CODE_FILES = ("modeling_moe_bert.py", "configuration_moe_bert.py", "moe.py", *MOE_PARTS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny trained-model folder: MoE-BERT weights + code (save_pretrained) and a tokenizer."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = ptmoe.MoeBertForMaskedLM(ptmoe.MoeBertConfig(**TINY))
    model.save_pretrained(root)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]))
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the experts of the tiny model, with non-zero weights so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters") / "assin2-lora"
    model = ptmoe.MoeBertForMaskedLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=r".*\.experts\.\d+\.(wi|wo)", init_lora_weights=False)
    )
    peft_model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def prepared(model_dir, adapter_dir, tmp_path_factory) -> dict:
    """The one full prepare + verify run of this file (about 30 s); other tests copy its output."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    return prepare(
        model_dir,
        out,
        adapters=[adapter_dir],
        zoo_name="moe-bertimbau-base-top2-8e",
        repo_id="ptmoe-test/moe-bertimbau-tiny",
    )


@pytest.fixture
def verified_copy(prepared, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(prepared["out_dir"], copy)
    return copy


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# ---------------------------------------------------------------------------------------------------- prepare + verify


def test_prepare_builds_and_verifies_a_hub_folder(prepared, model_dir):
    out, stamp = prepared["out_dir"], prepared["stamp"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "tokenizer.json",
        STAMP_NAME,
        *CODE_FILES,
    } <= files
    assert {
        "adapters/assin2-lora/adapter_config.json",
        "adapters/assin2-lora/adapter_model.safetensors",
    } <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"] == (
        "modeling_moe_bert.MoeBertForMaskedLM"
    )
    assert stamp["auto_class"] == "AutoModelForMaskedLM"
    assert stamp["adapters"] == ["assin2-lora"]
    assert stamp["max_abs_difference"] <= 1e-5
    # logits, router logits and expert indices of the base model and of the model with the adapter
    assert stamp["outputs_compared"] >= 6
    assert set(stamp["files"]) == files - {STAMP_NAME}
    assert stamp["versions"]["ptmoe"] == ptmoe.__version__
    assert check_verified(out)["files"] == stamp["files"]


def test_prepared_card_is_the_zoo_variant_card(prepared):
    readme = prepared["out_dir"] / "README.md"
    validate_card(readme)
    metadata = metadata_load(readme)
    assert metadata["base_model"] == "neuralmind/bert-base-portuguese-cased" and metadata["license"] == "mit"
    assert 'from_pretrained("ptmoe-test/moe-bertimbau-tiny", trust_remote_code=True)' in readme.read_text()


def test_verify_fails_on_edited_weights(verified_copy, model_dir):
    weights = load_file(verified_copy / "model.safetensors")
    name = next(k for k in weights if "experts.0.wo.weight" in k)
    weights[name] = weights[name] + 0.01
    save_file(weights, verified_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HubUploadError, match="does not reproduce the source model") as error:
        verify_folder(verified_copy, model_dir)
    assert f"changed: ['{name}']" in str(error.value)
    assert not (verified_copy / STAMP_NAME).exists()  # a failed folder is no longer stamped


def test_verify_fails_on_missing_modeling_file(verified_copy, model_dir):
    (verified_copy / "moe.py").unlink()
    with pytest.raises(HubUploadError, match=r"moe\.py is missing \(imported by the model code\)"):
        verify_folder(verified_copy, model_dir)


def test_verify_fails_on_missing_part_of_moe(verified_copy, model_dir):
    (verified_copy / "routers.py").unlink()  # imported by moe.py, which the modeling file imports
    with pytest.raises(HubUploadError, match=r"routers\.py is missing \(imported by the model code\)"):
        verify_folder(verified_copy, model_dir)


def test_verify_fails_on_pickle_weights(verified_copy, model_dir):
    torch.save({"w": torch.zeros(1)}, verified_copy / "pytorch_model.bin")
    with pytest.raises(HubUploadError, match=r"pickle files \['pytorch_model.bin'\]"):
        verify_folder(verified_copy, model_dir)


def test_verified_folder_changed_afterwards_is_detected(verified_copy):
    (verified_copy / "README.md").write_text((verified_copy / "README.md").read_text() + "\nedited\n")
    (verified_copy / "notes.txt").write_text("extra")
    with pytest.raises(HubUploadError, match=r"changed: \['README.md'\]; added: \['notes.txt'\]"):
        check_verified(verified_copy)


def test_prepare_refuses_pickle_weights(model_dir, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    torch.save({"w": torch.zeros(1)}, source / "pytorch_model.bin")
    with pytest.raises(HubUploadError, match=r"pickle weights \['pytorch_model.bin'\].*safetensors only"):
        build_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_leaves_trainer_state_behind(model_dir, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    torch.save({"lr": 1e-4}, source / "training_args.bin")
    out, _ = build_folder(source, tmp_path / "out")
    assert not (out / "training_args.bin").exists() and (out / "model.safetensors").is_file()


def test_prepare_copies_missing_code_from_ptmoe(model_dir, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    for name in CODE_FILES:
        (source / name).unlink()
    out, notes = build_folder(source, tmp_path / "out")
    models_dir = Path(ptmoe.models.__file__).parent
    for name in CODE_FILES:
        assert (out / name).read_bytes() == (models_dir / name).read_bytes()
    assert any("from the installed ptmoe" in note for note in notes)


def test_prepare_adds_a_missing_auto_map(model_dir, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    config = json.loads((source / "config.json").read_text())
    del config["auto_map"]
    (source / "config.json").write_text(json.dumps(config))
    out, notes = build_folder(source, tmp_path / "out")
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_moe_bert.MoeBertConfig"
    assert any("auto_map" in note for note in notes)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda src, out: (src / "model.safetensors").unlink(), "no safetensors weights"),
        (lambda src, out: (out.mkdir(), (out / "x").write_text("x")), "not empty"),
        (lambda src, out: (src / "config.json").unlink(), "has no config.json"),
    ],
)
def test_prepare_refuses_bad_input(model_dir, tmp_path, setup, message):
    source, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(model_dir, source)
    setup(source, out)
    with pytest.raises(HubUploadError, match=message):
        build_folder(source, out)


def test_prepare_refuses_a_card_without_parseable_metadata(model_dir, tmp_path):
    card = tmp_path / "CARD.md"
    card.write_text("---\nlicense: [mit\n---\n# card\n")
    with pytest.raises(HubUploadError, match="does not parse"):
        build_folder(model_dir, tmp_path / "out", card=card)


def test_prepare_uses_a_given_card(model_dir, tmp_path):
    card = tmp_path / "CARD.md"
    card.write_text("---\nlicense: mit\nlanguage: pt\n---\n# My card\n")
    out, _ = build_folder(model_dir, tmp_path / "out", card=card)
    assert (out / "README.md").read_text() == card.read_text()


def test_cli_prepare_reports_errors(model_dir, tmp_path, capsys):
    assert hub_upload_main(["prepare", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- push


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls `push` makes and returns a fake commit."""

    instances: list[RecordingHfApi] = []

    def __init__(self, token=None, fail_with: str | None = None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.fail_with = fail_with
        RecordingHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail_with:
            raise RuntimeError(self.fail_with)

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

        return Commit()


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    RecordingHfApi.instances = []
    return RecordingHfApi


def test_push_refuses_an_unverified_folder(model_dir, tmp_path, recorder):
    out, _ = build_folder(model_dir, tmp_path / "out")  # built, never verified
    with pytest.raises(HubUploadError, match="is not verified"):
        push(out, "ptmoe-test/tiny", dry_run=False, api_factory=recorder)
    assert recorder.instances == []


def test_push_refuses_a_folder_changed_after_verification(verified_copy, recorder):
    (verified_copy / "config.json").write_text(
        (verified_copy / "config.json").read_text().replace("4", "5", 1)
    )
    with pytest.raises(HubUploadError, match=r"changed after it was verified \(changed: \['config.json'\]\)"):
        push(verified_copy, "ptmoe-test/tiny", dry_run=False, api_factory=recorder)
    assert recorder.instances == []


def test_push_dry_run_lists_files_and_sends_nothing(verified_copy, recorder):
    lines = []
    assert push(verified_copy, "ptmoe-test/tiny", api_factory=recorder, print_fn=lines.append) is None
    text = "\n".join(lines)
    assert recorder.instances == []
    assert "Dry run: would upload" in text and "--no-dry-run" in text
    assert "model.safetensors" in text and "adapters/assin2-lora/adapter_model.safetensors" in text
    assert STAMP_NAME not in text and "KB" in text


def test_push_creates_the_repo_and_uploads_the_folder(verified_copy, recorder, capsys):
    commit = push(
        verified_copy,
        "ptmoe-test/tiny",
        private=True,
        revision="v0.1",
        commit_message="Add tiny MoE-BERTimbau",
        dry_run=False,
        api_factory=recorder,
    )
    (api,) = recorder.instances
    assert api.token == TOKEN  # from HF_TOKEN, handed to the client only
    assert api.calls == [
        ("create_repo", dict(repo_id="ptmoe-test/tiny", private=True, exist_ok=True, repo_type="model")),
        ("create_branch", dict(repo_id="ptmoe-test/tiny", branch="v0.1", exist_ok=True, repo_type="model")),
        (
            "upload_folder",
            dict(
                repo_id="ptmoe-test/tiny",
                folder_path=str(verified_copy),
                repo_type="model",
                revision="v0.1",
                commit_message="Add tiny MoE-BERTimbau",
                ignore_patterns=[STAMP_NAME],
            ),
        ),
    ]
    assert commit.commit_url.endswith("/commit/abc123")
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert TOKEN.encode() not in _all_bytes(verified_copy)


def test_push_never_shows_the_token_in_errors(verified_copy, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def failing_api(token):
        return RecordingHfApi(token=token, fail_with=f"401 Unauthorized for token {token}")

    with pytest.raises(HubUploadError) as error:
        push(verified_copy, "ptmoe-test/tiny", dry_run=False, api_factory=failing_api)
    assert TOKEN not in str(error.value) and "***" in str(error.value)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_push_without_a_token_says_how_to_log_in(verified_copy, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubUploadError, match="set the HF_TOKEN environment variable or log in"):
        push(verified_copy, "ptmoe-test/tiny", dry_run=False, api_factory=RecordingHfApi)


def test_push_rejects_a_malformed_repo_id(verified_copy):
    with pytest.raises(HubUploadError, match="ORG/NAME"):
        push(verified_copy, "no-org")


def test_cli_push_defaults_to_a_dry_run(verified_copy, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(
        "huggingface_hub.HfApi", lambda **kwargs: pytest.fail("a dry run must not build a client")
    )
    assert hub_upload_main(["push", str(verified_copy), "--repo-id", "ptmoe-test/tiny"]) == 0
    out = capsys.readouterr().out
    assert "Nothing was uploaded" in out and TOKEN not in out


def test_cli_push_refuses_unverified_folder(model_dir, tmp_path, capsys):
    out, _ = build_folder(model_dir, tmp_path / "out")
    assert hub_upload_main(["push", str(out), "--repo-id", "ptmoe-test/tiny", "--no-dry-run"]) == 2
    assert "is not verified" in capsys.readouterr().err
