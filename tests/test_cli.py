import subprocess
import sys

import visadapt
from visadapt.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "visadapt.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"visadapt {visadapt.__version__}"
    out = subprocess.run([sys.executable, "-m", "visadapt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "env" in out.stdout


def test_a_diverged_run_exits_3_with_the_step(monkeypatch, capsys, tmp_path):
    from visadapt.fewshot import train as fewshot_train
    from visadapt.utils import TrainingDiverged

    def diverge(config, out, resume=False):
        raise TrainingDiverged("Training diverged at step 7: the loss is nan.")

    monkeypatch.setattr(fewshot_train, "train", diverge)
    code = main(["fewshot", "train", "--dataset", "imagefolder", "--root", str(tmp_path), "--out",
                 str(tmp_path / "run")])
    assert code == 3 and "step 7" in capsys.readouterr().err
