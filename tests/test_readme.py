"""The README's first command and its Python examples run verbatim (random weights instead of the OpenAI
download), and so does the incremental pipeline's console example."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_python

README = Path(__file__).parents[1] / "README.md"


def _demo_command() -> list[str]:
    """The part after ``&&`` of the first command under "Try it" (the part before it is the install)."""
    first = re.search(r"## Try it.*?```bash\n(.*?)\n", README.read_text(), flags=re.S).group(1)
    command = shlex.split(first.split("&&")[1])
    assert command[:4] == ["visadapt", "fewshot", "train", "--demo"], command
    return command


@pytest.mark.slow
def test_first_command_and_examples_run(tmp_path):
    command = _demo_command()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    demo = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "zero-shot" in demo.stdout and "few-shot" in demo.stdout
    run = tmp_path / command[command.index("--out") + 1]
    for name in ("report.md", "results.json", "training_curve.png", "adapter/adapter_model.safetensors",
                 "lora/adapter_model.safetensors"):
        assert (run / name).is_file(), name

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its quickstart"
    code = "\n".join(blocks).replace('pretrained="openai"', "pretrained=None")
    # as if started in the repository root, which Python puts first on sys.path (its folders must shadow nothing)
    root_first = f"import os, sys\nsys.path.insert(0, r'{README.parent}')\nos.chdir(r'{tmp_path}')\n"
    proc = run_python(root_first + code, tmp_path)
    assert "trainable params: 103,680" in proc.stdout
    runs = tmp_path / "runs"  # every example writes under runs/ (git-ignored), none into the repository root
    assert (runs / "clip-block-lora" / "adapter_model.safetensors").exists()
    assert (runs / "clip-lora" / "adapter_config.json").exists()
    assert (runs / "my-classifier" / "pipeline.json").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"runs", "script.py"}, sorted(tmp_path.iterdir())


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    block = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), flags=re.S).group(1)
    command = block.splitlines()[0].split("#")[0].strip()  # the first line runs everything; the others are subsets
    assert command == "python -m pytest -q" and command in ci


@pytest.mark.slow
def test_easyref_offline_lines_run(tmp_path):
    """The EasyRef section's offline block (demo groups, a tiny stage, eval with the shipped metric models) runs
    verbatim, offline, writing only under runs/ of its working folder."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
                 if "visadapt easyref demo-data" in b)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(["bash", "-c", "set -e\n" + block], cwd=work, capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    run = work / "runs" / "easyref-demo"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert len(results["groups"]) == 3 and all(v is not None for v in results["metrics"].values())
    assert (run / "stage1" / "easyref.safetensors").is_file() and (run / "eval" / "grid.png").is_file()


def _pycon(marker: str) -> str:
    """The statements of the README's ```pycon block that mentions ``marker``, prompts removed."""
    for block in re.findall(r"```pycon\n(.*?)```", README.read_text(), flags=re.S):
        if marker in block:
            return "\n".join(line[4:] for line in block.splitlines() if line.startswith((">>> ", "... ")))
    raise AssertionError(f"README has no ```pycon block with {marker}")


@pytest.mark.slow
def test_incremental_pipeline_example_runs(tmp_path):
    """The console example after the incremental demo runs verbatim on a demo run (no training epochs: the same
    sessions and classes as the demo's, in seconds) and writes under runs/ only."""
    from visadapt.incremental.demo import run_demo

    run_demo(tmp_path / "runs" / "inc", recipes=("coact",), seeds=(1,),
             overrides=dict(epochs_base=0, epochs_incremental=0))
    code = _pycon("IncrementalClassifierPipeline.from_pretrained")
    check = "\nassert out.probs.shape == (9, 9) and pipe.class_names[-1] == 'striped square', pipe.class_names\n"
    run_python(f"import os\nos.chdir(r'{tmp_path}')\n" + code + check, tmp_path)
    assert (tmp_path / "runs" / "my-incremental" / "pipeline.json").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"runs", "script.py"}
