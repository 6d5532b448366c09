"""scripts/bench_quality.py: the quick modes write their table and PNG; bad input exits with one line."""

from __future__ import annotations

import json

import pytest
from test_scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_upcycle_writes_table_and_png(tmp_path):
    result = load_script("bench_quality").main(["--quick", "--output_dir", str(tmp_path)])
    assert set(result["curves"]) == {
        "dense", "copy top-2", "noise top-2", "drop top-2", "copy top-1", "noise top-1", "drop top-1",
    }  # fmt: skip
    assert all(len(runs) == 3 for runs in result["curves"].values())  # 3 seeds
    # same batches: at step 0 every copy-upcycled model (top-2, renormalised) scores exactly as dense
    dense0 = [run[0]["loss"] for run in result["curves"]["dense"]]
    copy0 = [run[0]["loss"] for run in result["curves"]["copy top-2"]]
    assert copy0 == pytest.approx(dense0, abs=1e-5)
    table = (tmp_path / "bench_quality.md").read_text()
    assert "| drop top-1 |" in table and "better than dense" in table
    assert (tmp_path / "bench_quality.png").stat().st_size > 0
    saved = json.loads((tmp_path / "bench_quality.json").read_text())
    assert (
        saved["params"]["copy top-2"]["train_flops_per_token"]
        > saved["params"]["dense"]["train_flops_per_token"]
    )


def test_quick_router_variants_train_at_top2_compute(tmp_path):
    result = load_script("bench_quality").main(
        ["--quick", "--seeds", "1", "--router_variants", "--output_dir", str(tmp_path)]
    )
    for name in ("drop expert-choice c=2", "drop hierarchical 2x top-2"):
        curve = result["curves"][name][0]
        assert curve[-1]["step"] == 6 and curve[-1]["loss"] == curve[-1]["loss"]  # trained, finite
        # same active compute as top-2 (capacity 2 / two experts per token), up to the group gate's few weights
        assert result["params"][name]["active"] == pytest.approx(
            result["params"]["drop top-2"]["active"], rel=0.01
        )


def test_quick_domains_writes_table_and_png(tmp_path):
    result = load_script("bench_quality").main(
        ["--quick", "--mode", "domains", "--seeds", "1", "--output_dir", str(tmp_path)]
    )
    assert result["domains"] == ["informal", "juridico", "noticias", "saude"]
    assert set(result["purity"][0]) == set(result["domains"])
    table = (tmp_path / "bench_domains.md").read_text()
    assert "| merged MoE (after MiX) |" in table and "routing purity" in table
    for name in ("bench_domains.png", "bench_domains_expert_load.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_input_exits_with_one_line(tmp_path, capsys):
    bench = load_script("bench_quality")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--train_file" in capsys.readouterr().err
    corpus = tmp_path / "plain.txt"
    corpus.write_text("uma frase sem domínio nenhum para o teste.\n" * 200, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(
            ["--quick", "--mode", "domains", "--train_file", str(corpus), "--output_dir", str(tmp_path / "o")]
        )
    assert exit_info.value.code == 2 and "needs >= 2 domains" in capsys.readouterr().err


def test_quick_contrastive_stages(tmp_path):
    """--objective contrastive: upcycle (equal steps and equal wall time), domains (BTX, saved) and lora (on them)."""
    bench = load_script("bench_quality")
    common = ["--quick", "--objective", "contrastive", "--seeds", "1", "--threads", "1"]
    up = bench.main([*common, "--output_dir", str(tmp_path / "u")])
    assert set(up["runs"]) == {"dense", "copy top-1", "drop top-1", "copy top-2", "drop top-2"}
    for (run,) in up["runs"].values():
        assert run["equal steps"]["step"] == 6 and set(run["equal steps"]) >= {"overall", *up["domains"]}
        assert 0 <= run["equal wall"]["overall"]["recall@1"] <= 1
    assert up["params"]["copy top-1"]["active"] == pytest.approx(up["params"]["dense"]["active"], rel=0.02)
    assert "| copy top-2 |" in (tmp_path / "u" / "contrastive_upcycle.md").read_text()
    btx = tmp_path / "d"
    domains = bench.main([*common, "--mode", "domains", "--mix_domain_loss_coef", "0.1", "--save_models",
                          "--output_dir", str(btx)])  # fmt: skip
    assert (
        "merged MoE (after MiX)" in domains["runs"] and (btx / "seed0" / "merged" / "config.json").is_file()
    )
    lora = bench.main([*common, "--mode", "lora", "--btx_dir", str(btx), "--output_dir", str(tmp_path / "l")])
    assert len(lora["runs"]) == 4  # two MoE + LoRA per expert, two budget-matched dense + LoRA
    budgets = list(lora["trainable"].values())
    for moe, dense in zip(budgets[::2], budgets[1::2], strict=True):
        assert dense == pytest.approx(moe, rel=0.35)  # dense rank rounded to the nearest whole rank
    with pytest.raises(SystemExit):
        bench.main([*common, "--mode", "lora", "--objective", "mlm", "--output_dir", str(tmp_path / "x")])
