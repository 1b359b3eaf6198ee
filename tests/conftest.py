import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402

import visadapt  # noqa: E402

KINDS = ("mlp", "vit", "clip")
METHODS = ("block", "comp")


def make_config(method: str, kind: str, **overrides):
    """A config with non-zero weights (init_weights=False) unless overridden."""
    common = dict(r=2, lora_alpha=4, init_weights=False, **models.TARGETS[kind])
    common.update(overrides)
    if method == "block":
        return visadapt.BlockLoraConfig(n_blocks=4, **common)
    return visadapt.CompLoraConfig(k=3, **common)


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with tests/ importable; fail with its stderr."""
    script = tmp_path / "script.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def pretrain_script(name: str):
    """``pretrain/<name>.py`` (a script of the repository, not a package module) imported as ``pretrain_<name>``."""
    module_name = f"pretrain_{name}"
    if module_name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "pretrain" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tracking_pipeline_dir(tmp_path_factory):
    """A demo-architecture tracker (shipped backbone, fresh adapters and head) saved as a pipeline folder."""
    from visadapt.tracking.config import TrackConfig
    from visadapt.tracking.pipeline import TrackingPipeline
    from visadapt.tracking.train import build_model, model_config

    folder = tmp_path_factory.mktemp("tracker")
    cfg = TrackConfig(variant="demo", r=4, lora_alpha=8.0)
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    TrackingPipeline(model, model_config(cfg)).save_pretrained(folder)
    return folder


@pytest.fixture()
def fresh_accelerator():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
