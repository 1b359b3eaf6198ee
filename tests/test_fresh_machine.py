"""What a newcomer meets on a fresh clone and venv: Python started in the repository root (``python -m pytest``,
``python -c``, scripts there) imports the installed distributions, never a folder of ours under their names; every
benchmark and pretraining script starts from the root with or without its own folder on sys.path; a run that does
not use DeepSpeed never imports it; a wheel ships the kernels and the worlds' weights."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
SCRIPTS = BENCHMARKS + sorted((ROOT / "pretrain").glob("*.py"))


def _env(**extra: str) -> dict[str, str]:
    """This environment without the switches that keep the script's folder and the cwd off sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _importable_names(folder: Path) -> set[str]:
    """Top-level names that Python started in ``folder`` can import from it: modules and regular packages (a folder
    without ``__init__.py`` is a PEP 420 namespace portion, which never shadows a package found later on the path)."""
    modules = {p.stem for p in folder.glob("*.py")}
    packages = {p.parent.name for p in folder.glob("*/__init__.py")}
    return modules | packages


@pytest.mark.parametrize("folder", [ROOT, ROOT / "benchmarks", ROOT / "pretrain"],
                         ids=["root", "benchmarks", "pretrain"])
def test_no_name_in_the_repository_shadows_an_installed_distribution(folder):
    distributions = importlib.metadata.packages_distributions().items()
    others = {name: sorted(set(dists) - {"visadapt"}) for name, dists in distributions}
    clashes = {name: others[name] for name in _importable_names(folder) if others.get(name)}
    assert not clashes, f"importable from {folder} under an installed distribution's name: {clashes}"


def test_the_guard_sees_a_clash(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "tests").mkdir()  # no __init__.py: a namespace portion, harmless
    assert _importable_names(tmp_path) == {"kernels", "torch"}


def test_python_started_in_the_root_imports_diffusers_and_transformers_hub_kernels():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` (``from kernels import CUDAProperties``): with the
    root on sys.path our ``kernels/`` folder must not be found in its place."""
    code = ("import transformers.integrations.hub_kernels\n"
            "from diffusers import StableDiffusionPipeline\n"
            "from visadapt import kernels as ours\n"
            "assert ours.__name__ == 'visadapt.kernels' and callable(ours.lora_linear)\n")
    if "kernels" in importlib.metadata.packages_distributions():  # Hugging Face's, a dependency of transformers 5.25
        code += "import kernels\nassert hasattr(kernels, 'CUDAProperties'), kernels.__file__\nprint(kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stdout.startswith(str(ROOT / "kernels")), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("safe_path", [False, True], ids=["script-folder-on-path", "PYTHONSAFEPATH"])
@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.stem}" for p in SCRIPTS])
def test_every_script_starts_from_the_root(script, safe_path):
    env = _env(PYTHONSAFEPATH="1") if safe_path else _env()
    proc = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_a_run_without_deepspeed_never_imports_it(tmp_path):
    """accelerate imports deepspeed (about 1 s, and its '[WARNING] Setting accelerator to CPU' in the middle of
    progress bars) when the trainer unwraps a model it never wrapped."""
    pytest.importorskip("deepspeed")
    proc = run_python(
        "import sys\n"
        "from test_training import ToyConfig, ToyTrainer\n"
        f"ToyTrainer(ToyConfig(checkpoint_every=4), {str(tmp_path / 'run')!r}).run()\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n", tmp_path)
    assert "deepspeed imported: False" in proc.stdout


@pytest.mark.slow
def test_the_kernel_cost_model_prints_only_its_table():
    """The profiler's C++ log (``USDT: ... profiler_start``, ``gpuGetDeviceCount failed``) stays out of the output."""
    proc = subprocess.run([sys.executable, "benchmarks/kernel_ops.py", "--model"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| op |" in proc.stdout
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if "USDT" in line or "gpuGetDeviceCount" in line]
    assert not noise, noise[:3]


@pytest.mark.slow
def test_a_wheel_installs_the_kernels_as_visadapt_kernels_and_ships_the_worlds_weights(tmp_path):
    """The folder mapping of pyproject (kernels/visadapt_kernels -> visadapt.kernels) holds in a wheel too, which
    installs no top-level ``kernels`` of ours; package-data brings every weight file of the worlds' models."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], env=_env(), capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("visadapt-*.whl"))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], env=_env(), capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (target / "kernels").exists() and (target / "visadapt" / "kernels" / "selfcheck.py").is_file()
    shipped = ROOT / "visadapt" / "utils" / "worlds"
    weights = sorted(p.relative_to(shipped) for folder in ("demo_clip", "demo_vit", "world_model")
                     for p in (shipped / folder).rglob("*") if p.is_file())
    installed = target / "visadapt" / "utils" / "worlds"
    # 15 model files, and the world model's two demo concept LoRAs with their concepts.json
    assert len(weights) == 18 and all((installed / p).is_file() for p in weights), weights
    lists = sorted(p.name for p in (ROOT / "visadapt" / "incremental" / "index_lists").iterdir())
    assert all((target / "visadapt" / "incremental" / "index_lists" / n).is_file() for n in lists), lists
    code = ("import visadapt.kernels as k, visadapt.utils.measure\n"
            "from visadapt.utils.worlds.models import demo_vit_config\n"
            "print(k.__file__); print(callable(k.lora_linear) and callable(k.set_backend))\n"
            "print(demo_vit_config()['timm_name'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(PYTHONPATH=str(target)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str(target / "visadapt" / "kernels" / "__init__.py"), "True",
                                        "vit_small_patch14_dinov2"]
