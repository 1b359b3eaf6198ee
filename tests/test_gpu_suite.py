"""benchmarks/gpu_suite.py: the dry run measures every part and writes the JSON and the tables; a hung or failing
subprocess is recorded, not fatal; without a GPU the plain command says so in one line and exits 0."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ("tests", "kernels", "composer", "tracking", "fewshot", "easyref")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_suite(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = run_suite("--out", str(tmp_path), timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stdout
    assert not any(tmp_path.iterdir())  # nothing to run, nothing written


def test_pytest_counts_from_the_summary_or_from_a_killed_run():
    suite = load_suite()
    out = ("tests/test_a.py::test_x[cuda] PASSED [ 50%]\ntests/test_a.py::test_y[bf16] FAILED [100%]\n"
           "==== 1 failed, 1 passed, 3 skipped, 2 deselected in 1.00s ====\n")
    counts = suite.pytest_counts(out)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["deselected"]) == (1, 1, 3, 2)
    assert counts["complete"] and counts["failing"] == ["tests/test_a.py::test_y[bf16]"]
    killed = suite.pytest_counts(out.rsplit("====", 2)[0])  # no summary line: count the -v lines
    assert (killed["passed"], killed["failed"], killed["complete"]) == (1, 1, False)
    with pytest.raises(ValueError):
        suite.pytest_counts("collecting ...\n")


def test_a_hang_and_a_crash_are_recorded_and_the_files_still_written(tmp_path):
    suite = load_suite()
    parse = suite.functools.partial(suite.json_row, "ROW ")
    ok = suite.Run("ok", [sys.executable, "-c", "print('ROW {\"s\": 1.5}')"], parse)
    crash = suite.Run("crash", [sys.executable, "-c", "raise SystemExit(3)"], parse)
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    hang = suite.Run("hang", [sys.executable, "-c", sleeper + "time.sleep(60)"], parse)  # its child holds the pipe too
    after = suite.Run("after", [sys.executable, "-c", "print('ROW {}')"], parse)
    part = suite.Part("fake", "a fake part", 4, lambda dry: suite.Plan("fake", [ok, crash, hang, after]),
                      lambda rows: {"s": rows["ok"]["s"]}, lambda n: suite.md_table(["s"], [[n["s"]]]))
    args = suite.parse_args(["--dry-run", "--out", str(tmp_path)])
    result = suite.Suite(args).run_part(part)
    runs = result["runs"]
    assert result["status"] == "timeout" and result["numbers"] == {"s": 1.5}
    assert runs["ok"]["status"] == "ok" and runs["crash"]["status"] == "failed" and runs["crash"]["returncode"] == 3
    assert runs["hang"]["status"] == "timeout" and runs["hang"]["wall_s"] < 10
    assert runs["after"]["status"] == "skipped"  # the hang used up the part's cap
    assert json.loads((tmp_path / "gpu_results.json").read_text())["parts"]["fake"]["status"] == "timeout"
    assert (tmp_path / "logs" / "fake-crash.log").is_file()


@pytest.mark.slow
def test_dry_run_measures_every_part(tmp_path):
    proc = run_suite("--dry-run", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert results["dry_run"] and results["environment"]["torch"] and results["wall_s"] > 0
    parts = results["parts"]
    assert set(parts) == set(PARTS)
    for name in PARTS:
        part = parts[name]
        assert part["status"] == "ok", (name, part)
        assert part["wall_s"] > 0 and part["commands"], name
        assert all(run["status"] == "ok" and run["wall_s"] > 0 for run in part["runs"].values()), name

    tests = parts["tests"]["numbers"]
    assert tests["complete"] and tests["failed"] == tests["errors"] == 0 and tests["passed"] >= 1
    kernels = parts["kernels"]["numbers"]
    assert all(kernels["ms"][op] > 0 for op in ("base", "fused", "fused-s", "peft", "routed"))
    assert all(kernels["ratios"][q] > 0 for q in ("fused/base", "fused-s/base", "fused/peft", "routed4/fused"))
    composer = parts["composer"]["numbers"]
    assert composer["plain"]["concepts"] == 0 and composer["compose"]["refined_steps"] > 0
    assert composer["plain"]["seconds"] > 0 and composer["compose"]["time_vs_plain"] > 0
    tracking = parts["tracking"]["numbers"]
    assert all(m["frames_per_s"] > 0 for m in tracking["models"].values()) and tracking["merged/plain"] > 0
    fewshot = parts["fewshot"]["numbers"]["block-lora"]  # the dry run skips lora: another 10 s of imports
    assert fewshot["median_step_s"] > 0 and fewshot["trainable_params"] > 0 and fewshot["mem_vs_lora"] is None
    easyref = parts["easyref"]["numbers"]["easyref-1"]
    assert easyref["encode_s"] > 0 and easyref["diffusion_s"] > 0

    md = (tmp_path / "gpu_results.md").read_text()
    for i, header in enumerate(("| passed |", "| fused/base |", "| × plain |", "| frames/s |", "| step peak MiB |",
                                "| encode s |"), 1):
        assert f"\n### {i}. " in md and header in md, header
    assert "Dry run" in md and sum(line.startswith("|---|") for line in md.splitlines()) == 6
    assert "[gpu_suite" in proc.stdout and "| fused/base |" in proc.stdout  # progress, then the tables
    assert (tmp_path / "logs").is_dir() and not list(tmp_path.glob(".*.tmp"))
