"""`--report_to mlflow`: a tiny training logged to a real local MLflow store (SQLite in a temp folder), read back
with `MlflowClient`: MoE parameters, router metric histories (per layer and mean), the expert-load PNG artifact, and
the evaluation metrics in the same run."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from test_scripts import DATA, FAST, checkpoints, load_script  # noqa: F401  (checkpoints is a fixture)

from ptmoe.telemetry import LAYER_STAT_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERIMENT = "ptmoe-test"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A SQLite tracking store and an artifact folder in `tmp_path`, reached through the environment variables
    transformers' `MLflowCallback` reads; nothing (URI, active run, experiment) is left behind for other tests."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    client = MlflowClient(tracking_uri=uri)
    # An explicit artifact location: the store's default (./mlartifacts) would write into the working directory.
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    yield client
    while mlflow.active_run() is not None:
        mlflow.end_run()
    # `mlflow.set_experiment` (how MLflowCallback applies MLFLOW_EXPERIMENT_NAME) keeps the experiment id in
    # mlflow's module state, which would point later runs at this deleted store: forget it.
    mlflow.tracking.fluent._active_experiment_id = None
    assert not mlflow.tracking._tracking_service.utils._tracking_uri, "the URI came from the environment only"


def test_train_mlm_logs_moe_params_router_metrics_and_expert_load_png(checkpoints, mlflow_store, tmp_path):  # noqa: F811
    out = tmp_path / "mlm"
    flags = [flag if flag != "none" else "mlflow" for flag in FAST]  # FAST has `--report_to none`
    load_script("train_mlm").main([
        "--model_name_or_path", checkpoints["moe_bert"], "--run_name", "tiny-moe-mlm",
        "--train_file", str(DATA / "corpus.txt"), "--validation_split_percentage", "5",
        "--output_dir", str(out), *flags, "--max_steps", "3",
    ])  # fmt: skip
    assert mlflow.active_run() is None, "the run is ended after evaluation"

    experiment = mlflow_store.get_experiment_by_name(EXPERIMENT)
    runs = mlflow_store.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "training and evaluation are one run"
    run = runs[0]
    assert run.info.run_name == "tiny-moe-mlm" and run.info.status == "FINISHED"

    params = run.data.params
    # the config fields (transformers' MLflowCallback) and ptmoe's MoE summary
    assert params["num_experts"] == "4" and params["num_experts_per_tok"] == "2"
    assert params["router_type"] == "topk" and params["capacity_factor"] == "1.25"
    assert params["moe.routing_algorithm"] == "topk"
    assert params["moe.num_moe_layers"] == "2" and params["moe.layers"] == "layer_0,layer_1"
    assert int(params["moe.active_parameters"]) < int(params["moe.total_parameters"])

    run_id = run.info.run_id
    for layer in ("layer_0", "layer_1", "mean"):
        for stat in LAYER_STAT_KEYS:
            history = mlflow_store.get_metric_history(run_id, f"router/{layer}/{stat}")
            # one point per logging step (3) plus the whole-run summary logged when training ends
            assert [m.step for m in history] == [1, 2, 3, 3], (layer, stat)
    balance = mlflow_store.get_metric_history(run_id, "router/layer_0/load_std")
    assert all(0.0 <= m.value <= 0.5 for m in balance)
    entropies = [m.value for m in mlflow_store.get_metric_history(run_id, "router/mean/router_entropy")]
    layer_entropies = [
        [m.value for m in mlflow_store.get_metric_history(run_id, f"router/{layer}/router_entropy")]
        for layer in ("layer_0", "layer_1")
    ]
    assert entropies == pytest.approx([(a + b) / 2 for a, b in zip(*layer_entropies, strict=True)])
    assert "eval_loss" in run.data.metrics and "loss" in run.data.metrics

    artifacts = {a.path for a in mlflow_store.list_artifacts(run_id, "router")}
    assert artifacts == {"router/expert_load.png", "router/expert_load_std.png"}
    png = mlflow_store.download_artifacts(run_id, "router/expert_load.png", str(tmp_path / "download"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
