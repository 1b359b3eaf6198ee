"""The README's Python quickstart runs verbatim (with random weights instead of the OpenAI download)."""

import re
from pathlib import Path

import pytest
from conftest import run_python

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its quickstart"
    code = "\n".join(blocks).replace('pretrained="openai"', "pretrained=None")
    proc = run_python(f"import os\nos.chdir(r'{tmp_path}')\n" + code, tmp_path)
    assert "trainable params: 103,680" in proc.stdout
    assert (tmp_path / "clip-block-lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "clip-lora" / "adapter_config.json").exists()


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), flags=re.S).group(1)
    assert command in ci
