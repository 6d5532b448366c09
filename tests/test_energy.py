"""Offline energy/CO₂e accounting with codecarbon (ptmoe/energy.py): no network, results JSON, card, bad input."""

from __future__ import annotations

import json
import socket
import time

import pytest

import ptmoe
from ptmoe.energy import CPU_POWER_MODES, EnergyTracker, check_codecarbon, load_energy_report

pytest.importorskip("codecarbon")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection and DNS lookup fails: a tracker that needed the network would error or fall back."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_tracker_reports_energy_offline(no_network):
    with EnergyTracker("bra", measure_power_secs=1) as tracker:
        sum(i * i for i in range(300_000))
        time.sleep(0.2)
    report = tracker.report
    assert report.energy_kwh > 0 and report.emissions_kg_co2e > 0 and report.duration_s > 0.2
    assert report.country_iso_code == "BRA" and report.cpu_power_mode in CPU_POWER_MODES
    # kg CO2e = kWh x the country's carbon intensity (codecarbon's bundled data, g/kWh)
    from codecarbon.input import DataSource

    intensity = DataSource().get_global_energy_mix_data()["BRA"]["carbon_intensity"] / 1000
    assert report.emissions_kg_co2e == pytest.approx(report.energy_kwh * intensity, rel=1e-3)
    assert no_network == []
    assert "kWh" in report.markdown() and "BRA" in report.markdown()


def test_training_script_writes_energy_to_results_json(tmp_path, no_network):
    from test_scripts import DATA, FAST, load_script
    from test_training import make_bert_tokenizer

    from conftest import TINY_BERT

    tokenizer = make_bert_tokenizer()
    model_dir = tmp_path / "moe"
    ptmoe.MoeBertForMaskedLM(
        ptmoe.MoeBertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer)})
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    fast = list(FAST)
    fast[fast.index("--report_to") + 1] = "codecarbon"
    metrics = load_script("finetune_classification").main([
        "--model_name_or_path", str(model_dir), "--train_file", str(DATA / "sentiment_train.jsonl"),
        "--validation_file", str(DATA / "sentiment_test.jsonl"), "--output_dir", str(out),
        "--energy_country_iso_code", "PRT", *fast,
    ])  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_energy_kwh", "train_emissions_kg_co2e", "train_energy_duration_s"):
        assert results[key] > 0 and metrics[key] == results[key]
    report = load_energy_report(out / "energy.json")
    assert report.energy_kwh == results["train_energy_kwh"] and report.country_iso_code == "PRT"
    assert no_network == []
    # the card of the trained folder shows the figures in its training section
    from ptmoe.cards import card_for_model_dir

    card = card_for_model_dir(out)
    assert "Energy and emissions" in card and f"{report.energy_kwh:.4g} kWh" in card


# --------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any work
# --------------------------------------------------------------------------------------------------------------
def test_missing_or_unknown_country():
    with pytest.raises(ValueError, match="--energy_country_iso_code"):
        check_codecarbon(None)
    with pytest.raises(ValueError, match="'XYZ' is not a country"):
        check_codecarbon("XYZ")
    with pytest.raises(ValueError, match="'atlantis' is not a region"):
        check_codecarbon("USA", "atlantis")
    assert check_codecarbon("usa", "california") == "USA"


def test_codecarbon_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "codecarbon" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install codecarbon"):
        check_codecarbon("BRA")


def test_no_way_to_measure_is_a_clear_error(monkeypatch):
    """codecarbon found no CPU/GPU/RAM power source: no energy figure, so no silent zero in the results."""
    import codecarbon

    class Unmeasurable:
        def __init__(self, **kwargs):
            self._hardware = []
            self.final_emissions_data = None

        def start(self):
            pass

        def stop(self):
            return None

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", Unmeasurable)
    tracker = EnergyTracker("BRA")
    tracker.start()
    with pytest.raises(RuntimeError, match="could not measure or estimate the energy"):
        tracker.stop()


def test_script_refuses_codecarbon_without_country(tmp_path):
    from test_scripts import DATA, FAST, load_script

    fast = list(FAST)
    fast[fast.index("--report_to") + 1] = "codecarbon"
    with pytest.raises(ValueError, match="--energy_country_iso_code"):
        load_script("finetune_classification").main([
            "--model_name_or_path", "unused", "--train_file", str(DATA / "sentiment_train.jsonl"),
            "--output_dir", str(tmp_path / "out"), *fast,
        ])  # fmt: skip
    assert not (tmp_path / "out").exists()
