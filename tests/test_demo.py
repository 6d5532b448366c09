"""The README's main job, `ptmoe demo`, end to end in its quick form."""

from __future__ import annotations

import json

from ptmoe.cli import main


def test_quick_demo_runs_every_stage_offline(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # copy-upcycling reproduces the dense model
    assert summary["metrics"]["upcycled vs dense max |Δlogit|"] < 1e-4
    for key in ("MoE accuracy (fp32)", "dense accuracy (fp32)", "MoE accuracy (4-bit)"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    assert summary["params"]["MoE"]["total"] > summary["params"]["MoE"]["active"]
    assert summary["sizes_mb"]["MoE 4-bit in memory"] < summary["sizes_mb"]["MoE fp32 in memory"]
    assert (out / "hub-folder" / ".ptmoe_verified.json").exists()
    assert (out / "expert_load.png").stat().st_size > 0
    assert not list(out.rglob("*.bin"))
    # Written beside the target and moved into place: no staging folder left, no staging path recorded.
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert json.loads((out / "moe-sentiment" / "config.json").read_text())["upcycled_from"] == str(
        out / "dense-mlm"
    )
    # A second run never replaces the first one's results without --overwrite (and fails before any work).
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
