"""The ``visadapt`` command: one sub-command group per task."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from visadapt.version import __version__


def _env(_: argparse.Namespace) -> int:
    """Print the versions that matter for a bug report (see :mod:`visadapt.utils.environment`)."""
    from visadapt.utils.environment import report

    print(report())
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: MemoryError, torch's OutOfMemoryError, or the RuntimeError torch raises when a CPU
    allocation or a tensor's size fails (a size option in range but far too large for the machine: --rank 10**12)."""
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "size calculation overflowed" in text))


def build_parser() -> argparse.ArgumentParser:
    from visadapt.utils.cli import ArgumentParser

    parser = ArgumentParser(  # one-line usage errors, in every sub-command too (they take its class)
        prog="visadapt",
        description="Low-rank adaptation methods for vision and diffusion models (peft, timm, open_clip, "
                    "diffusers).",
    )
    parser.add_argument("--version", action="version", version=f"visadapt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="print the versions of visadapt and its dependencies, flagging any outside "
                                          "the tested range")
    env.set_defaults(func=_env)
    from visadapt.fewshot.cli import add_commands as add_fewshot

    add_fewshot(commands)
    from visadapt.hyperspectral.cli import add_commands as add_hsi

    add_hsi(commands)
    from visadapt.diffusion.concept.cli import add_commands as add_concept

    add_concept(commands)
    from visadapt.incremental.cli import add_commands as add_incremental

    add_incremental(commands)
    from visadapt.diffusion.easyref.cli import add_commands as add_easyref

    add_easyref(commands)
    from visadapt.tracking.cli import add_commands as add_track

    add_track(commands)
    from visadapt.apps.composer import add_command as add_app  # light: gradio loads when the app starts

    add_app(commands)
    return parser


def user_message(err: BaseException) -> str:
    """``err``'s message for the one-line ``error:`` exit. An error raised in a DataLoader worker comes back with the
    worker's traceback in its message (torch re-raises ``Caught X in DataLoader worker …``): its own text, from the
    traceback's last entry, is kept."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    kind = type(err)
    names = (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: ")
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        name = next((n for n in names if lines[i].startswith(n)), None)
        if name:
            return "\n".join([lines[i][len(name):], *lines[i + 1:]])
    return lines[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from visadapt.utils import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as err:  # the step and the cause; nothing was written
        print(f"visadapt: {err}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as err:  # user errors: bad paths, layouts, settings; the message names the fix
        if os.environ.get("VISADAPT_DEBUG"):
            raise
        print(f"visadapt: error: {user_message(err)}\n(set VISADAPT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if os.environ.get("VISADAPT_DEBUG") or not _out_of_memory(err):
            raise
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"visadapt: error: out of memory ({cause}); lower the sizes the run asks for (--rank, --batch-size, "
              "--patch, --resolution, …).\n(set VISADAPT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
