"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success move each file into ``out_dir`` with an atomic rename.

    Files are moved in name order with ``adapter_config.json``-style ``*.json`` last, so a reader that finds the
    config also finds complete weights. On error nothing in ``out_dir`` changes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
        for src in sorted(stage.iterdir(), key=lambda p: (p.suffix == ".json", p.name)):
            os.replace(src, out / src.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
