"""Shared test setup: offline Hub, tiny configs, and a runner for "ptmoe is not installed" subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# No test may reach the Hub: set before transformers / datasets / evaluate are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on 2 shared cores, OpenMP threads spin against each other and
    can make each small op ~100x slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
    moe_layers=[0, 1],
)


# The sibling modules `ptmoe/models/moe.py` re-exports: they travel with every saved checkpoint (trust_remote_code).
MOE_PARTS = (
    "moe_config.py",
    "input_checks.py",
    "routers.py",
    "moe_block.py",
    "router_losses.py",
    "moe_params.py",
    "moe_loading.py",
    "moe_pretrained.py",
)


@pytest.fixture
def tiny_bert_config():
    """Factory: `tiny_bert_config(**overrides)` → a tiny `MoeBertConfig`."""
    import ptmoe

    def make(**overrides):
        return ptmoe.MoeBertConfig(**{**TINY_BERT, **overrides})

    return make


def run_without_ptmoe(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import ptmoe` fails, as on a machine without ptmoe installed.

    The remote-code module cache and the working directory live in `tmp_path`.
    """
    script = "import sys\nsys.modules['ptmoe'] = None  # ptmoe is not importable here\n" + textwrap.dedent(
        code
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result
