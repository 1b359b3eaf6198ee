import subprocess
import sys

import visadapt
from visadapt.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "visadapt.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"visadapt {visadapt.__version__}"
    out = subprocess.run([sys.executable, "-m", "visadapt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "env" in out.stdout


def test_env_lists_dependencies(capsys):
    assert main(["env"]) == 0
    printed = capsys.readouterr().out
    assert "peft 0.21" in printed and "open_clip_torch" in printed
