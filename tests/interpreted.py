"""Re-running a kernel test file's Triton cases in a fresh ``TRITON_INTERPRET=1`` process (the variable must be set
before ``triton.jit`` runs), for the CPU machines that have Triton but no CUDA."""

import os
import subprocess
import sys
from pathlib import Path


def require_interpreted_run(test_file: str, keyword: str, backend: str, min_passed: int, timeout: int,
                            allow_skipped: bool = True) -> None:
    """Run the tests of ``test_file`` matching ``keyword`` with the interpreter and ``VISADAPT_KERNELS=backend``;
    require that at least ``min_passed`` ran and passed, none failed (and, unless ``allow_skipped``, none skipped)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "VISADAPT_KERNELS": backend}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword,
                           str(test_file)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(__file__).parent.parent)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, tail
    assert allow_skipped or "skipped" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= min_passed, tail
