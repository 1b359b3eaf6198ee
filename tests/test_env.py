"""``visadapt env``: every dependency with its installed, declared and tested version; one line per dependency outside
the declared range, one line naming what differs from the last green CI run (constraints/tested.txt)."""

from __future__ import annotations

from pathlib import Path

from visadapt.cli import main
from visadapt.utils.environment import dependencies, installed_version, report

ROOT = Path(__file__).resolve().parents[1]


def test_env_lists_the_dependencies_a_bug_report_needs(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "peft", "open-clip-torch", "transformers", "diffusers", "deepspeed", "av", "kernels",
                 "triton", "matplotlib", "scipy", "tqdm", "numpy"):
        assert f"| {name} | " in out, name
    assert "cuda available:" in out and not any(line.startswith("!") for line in out.splitlines())


def test_a_dependency_outside_its_range_is_flagged_in_one_line(tmp_path):
    fake = {"peft": "0.22.0"}
    text = report(lambda name: fake.get(name) or installed_version(name), tmp_path / "none.txt")
    flagged = [line for line in text.splitlines() if line.startswith("!")]
    assert flagged == ["! peft 0.22.0 is outside the range visadapt is tested with (<0.22,>=0.21): "
                       "pip install 'peft<0.22,>=0.21'"]


def test_versions_that_differ_from_the_tested_ones_are_named(tmp_path):
    tested = tmp_path / "tested.txt"
    tested.write_text(f"# a comment\ntorch=={installed_version('torch')}\ntransformers==0.0.1\n-e file:///x\n")
    rows = {row.name: row for row in dependencies(tested_file=tested)}
    assert rows["transformers"].tested == "0.0.1" and rows["diffusers"].tested is None
    last = report(tested_file=tested).splitlines()[-1]
    assert last.startswith("differs from the last green CI run") and "transformers" in last and "torch" not in last


def test_the_repository_keeps_the_tested_versions_of_every_direct_dependency():
    pins = {row.name: row.tested for row in dependencies(tested_file=ROOT / "constraints" / "tested.txt")
            if row.required}
    assert all(pins.values()), [name for name, version in pins.items() if not version]
