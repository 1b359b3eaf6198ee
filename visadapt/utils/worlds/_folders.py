"""How a world writes itself to disk: a folder built once per set of parameters, then reused."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

MARKER = "world.json"


def write_marked(dest: Path, marker: dict, fill: Callable[[Path], None]) -> None:
    """Make ``dest`` the folder that ``fill`` writes, marked with ``marker`` (its ``world.json``).

    A ``dest`` whose marker already records ``marker`` is reused as it is. Otherwise ``fill`` writes into a staging
    folder beside ``dest``, which then replaces it in one rename; a concurrent writer that finished the same folder
    first is taken as it is.
    """
    if read_marker(dest) == marker:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(stage)
        (stage / MARKER).write_text(json.dumps(marker, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)
    except OSError:
        if read_marker(dest) != marker:
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
