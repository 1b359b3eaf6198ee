"""README.md's demo passages are what the demos print: ``benchmarks/readme_demos.py --check`` on the incremental and
hyperspectral demos (the incremental one's nine runs take about 75 s of CPU time), and a changed number fails the
check.

The hyperspectral demo prints the same scores on 1 and 2 threads and on the AMD EPYC and Intel Xeon machines the
README was measured on; the incremental one (three seeds of the pattern world) was measured on the Intel Xeon only,
where its nine runs score the same on 1 and 2 threads. The few-shot passage (about 100 s) would add a minute too many,
and the tracking scores move with the CPU's kernels and the thread count: ``python benchmarks/readme_demos.py
--check`` checks them on the machine named under their table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "readme_demos.py"
CHEAP = "incremental,hsi"


def _script():
    spec = importlib.util.spec_from_file_location("readme_demos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the dataclass looks its module up while the file runs
    spec.loader.exec_module(module)
    return module


demos = _script()


def _change_a_number(passage: str) -> str:
    """The passage with its first score one point higher."""
    return re.sub(r"(?<![\w.])\d+\.\d\b", lambda m: f"{float(m.group()) + 1:.1f}", passage, count=1)


def test_every_demo_passage_is_marked_once_with_its_provenance():
    text = demos.README.read_text()
    for name in demos.DEMOS:
        passage = demos.read_region(text, name)
        assert re.search(r"\d+\.\d", demos.numbers(passage)), name
        assert demos.PROVENANCE + "20" in passage, f"{name}: no '(measured <date> …' line"


def test_the_check_ignores_provenance_and_wrapping_but_not_a_number():
    passage = demos.read_region(demos.README.read_text(), "tracking")
    other_day = re.sub(r"\(measured \d{4}-\d\d-\d\d", "(measured 1999-01-01", passage).replace(" | ", " |  ")
    assert demos.diff("tracking", passage, other_day) == ""
    delta = demos.diff("tracking", passage, _change_a_number(passage))
    assert delta.startswith("---") and "\n-| " in delta and "\n+| " in delta


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    runs = tmp_path_factory.mktemp("readme-demos")
    return runs, demos.main(["--check", "--only", CHEAP, "--runs", str(runs)])


@pytest.mark.slow
def test_cheap_demo_passages_are_what_the_demos_print(checked):
    _, status = checked
    assert status == 0, "README.md's demo numbers differ from a fresh run (diff above); see benchmarks/readme_demos.py"


@pytest.mark.slow
def test_a_changed_number_fails_the_check_and_write_restores_it(checked, tmp_path, capsys):
    runs, _ = checked
    readme = tmp_path / "README.md"
    text = demos.README.read_text()
    passage = demos.read_region(text, "incremental")
    readme.write_text(demos.replace(text, "incremental", _change_a_number(passage)))
    reuse = ["--only", "incremental", "--runs", str(runs), "--reuse", "--readme", str(readme)]
    capsys.readouterr()
    assert demos.main(["--check", *reuse]) == 1
    assert "--write --only incremental" in capsys.readouterr().out
    assert demos.main(["--write", *reuse]) == 0
    fresh = demos.render("incremental", {"run": runs / "incremental" / "run"}, demos.provenance(2))
    assert demos.numbers(demos.read_region(readme.read_text(), "incremental")) == demos.numbers(fresh)
