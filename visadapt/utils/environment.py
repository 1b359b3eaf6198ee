"""The versions behind a run, as ``visadapt env`` prints them for bug reports.

Each dependency is shown with the version installed, the range visadapt declares for it (read from the installed
distribution's metadata, extras included) and the version the last green CI run installed (``constraints/tested.txt``
in a clone of the repository; ``pip install -e ".[dev]" -c constraints/tested.txt`` reproduces that run). A
dependency outside its declared range is flagged on a line of its own, and one line lists those that differ from the
tested versions.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import platform
from pathlib import Path
from typing import Callable, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# a clone's constraints file: visadapt/utils/environment.py -> the repository root
TESTED_FILE = Path(__file__).resolve().parents[2] / "constraints" / "tested.txt"
# not declared by visadapt, but behind most version-dependent bugs: the Triton compiler, Hugging Face's kernels
# (imported by transformers), the hub client, tokenizers, numpy, Pillow
INDIRECT = ("triton", "kernels", "huggingface-hub", "tokenizers", "numpy", "pillow")


@dataclasses.dataclass(frozen=True)
class Dependency:
    name: str
    installed: Optional[str]  # None: not installed
    required: str  # the declared specifier ("" for an indirect dependency, "any" for a bare requirement)
    tested: Optional[str]  # the last green CI run's version, None where unknown
    optional: bool = False  # from an extra (dev, deepspeed, video)

    @property
    def outside_range(self) -> bool:
        """Installed, declared, and not in the declared range (pip enforces it on install, not afterwards)."""
        if self.installed is None or self.required in ("", "any"):
            return False
        return not SpecifierSet(self.required).contains(self.installed, prereleases=True)


def installed_version(name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def declared() -> dict[str, tuple[str, bool]]:
    """visadapt's requirements: canonical name -> (specifier, from an extra only)."""
    found: dict[str, tuple[str, bool]] = {}
    for line in md.requires("visadapt") or []:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        optional = req.marker is not None and "extra" in str(req.marker)
        if name not in found or not optional:
            found[name] = (str(req.specifier) or "any", optional)
    return found


def tested_versions(path: Path = TESTED_FILE) -> dict[str, str]:
    """name -> version pinned in a constraints file (``name==version`` lines; others skipped); {} if absent."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version.strip()
    return pins


def dependencies(version_of: Callable[[str], Optional[str]] = installed_version,
                 tested_file: Path = TESTED_FILE) -> list[Dependency]:
    """Every declared dependency, then the indirect ones of :data:`INDIRECT`."""
    tested = tested_versions(tested_file)
    rows = [Dependency(name, version_of(name), spec, tested.get(name), optional)
            for name, (spec, optional) in declared().items()]
    rows += [Dependency(name, version_of(name), "", tested.get(name)) for name in INDIRECT]
    return rows


def report(version_of: Callable[[str], Optional[str]] = installed_version, tested_file: Path = TESTED_FILE) -> str:
    """The text of ``visadapt env``: a markdown table, then one line per dependency outside its range and one line
    naming the versions that differ from the tested ones."""
    from visadapt.version import ADAPTER_FORMAT_VERSION, __version__

    rows = dependencies(version_of, tested_file)
    lines = [f"visadapt {__version__} (adapter format {ADAPTER_FORMAT_VERSION})",
             f"python {platform.python_version()} on {platform.platform()}", "",
             "| package | installed | required | tested |", "|---|---|---|---|"]
    for row in rows:
        installed = row.installed or ("(not installed, optional)" if row.optional else "(not installed)")
        lines.append(f"| {row.name} | {installed} | {row.required or '(indirect)'} | {row.tested or '-'} |")
    lines.append("")
    for row in rows:
        if row.outside_range:
            lines.append(f"! {row.name} {row.installed} is outside the range visadapt is tested with "
                         f"({row.required}): pip install '{row.name}{row.required}'")
    differ = [f"{r.name} {r.installed} (tested {r.tested})" for r in rows
              if r.installed and r.tested and r.installed.split("+")[0] != r.tested.split("+")[0]]
    if differ:
        lines.append(f"differs from the last green CI run ({tested_file.name}): {', '.join(differ)}; "
                     f"pip install -e \".[dev]\" -c constraints/tested.txt reproduces that run")
    return "\n".join(lines)
