"""Writing files so that a crash never leaves a half-written one behind, with the permissions a user expects.

Every writer here writes a temporary file (or folder) beside its target and renames it into place. Temporary files
from ``tempfile`` are private (mode 0600); they are given the mode a plain ``open()`` would have given, so results
on a shared machine stay readable by whoever the user's umask allows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UntrustedFileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, directory: bool = False) -> None:
    """Give a temp file or folder the mode ``open()`` / ``mkdir()`` would have given it under the current umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on error it is removed.

    The temporary name keeps the suffix, so writers that pick a format from it (``savefig``, ``np.save``) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON so that ``path`` is never seen half-written."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


PIPELINE_CONFIG = "pipeline.json"


def read_pipeline_config(path: str | os.PathLike, written_by: str) -> dict:
    """A saved pipeline's ``pipeline.json``; a folder without one is an error naming what writes it
    (``written_by``, e.g. "`visadapt hsi train` or HyperspectralPipeline.save_pretrained")."""
    file = Path(path) / PIPELINE_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {PIPELINE_CONFIG}: pass a folder written by {written_by}.")
    return json.loads(file.read_text())


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
            _publish(src, directory=src.is_dir())
            os.replace(src, out / src.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def replace_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder that replaces the whole of ``out_dir`` on success, in one rename.

    Unlike :func:`staged_dir`, a reader never sees files of two writes mixed: it finds the old folder or the new one.
    The old folder is first renamed aside, then the stage renamed in; a crash between the two leaves no ``out_dir``
    and the aside copy, which :func:`recover_dir` puts back.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.with_name(f".{out.name}.old")
    try:
        yield stage
        _publish(stage, directory=True)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recover_dir(out_dir: str | os.PathLike) -> Path:
    """Finish an interrupted :func:`replace_dir`: put the aside copy back if ``out_dir`` is missing."""
    out = Path(out_dir)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.exists():
        os.replace(old, out)
    return out


# ------------------------------------------------------------------------------------------- untrusted weight files
_REPLACE = "Replace it with the file the run or the release wrote (nothing in it was run)"


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _why_not_safetensors(path: Path, err: Exception) -> UntrustedFileError:
    head, text = _head(path), str(err)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        reason = "not a safetensors file (it is a pickle or a torch zip, refused: pickles can carry code)"
    elif "incomplete metadata" in text or "header too small" in text or "not fully covered" in text:
        reason = "truncated safetensors file"
    else:
        reason = f"not a safetensors file ({text})"
    return UntrustedFileError(path, reason, _REPLACE)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file``, with a file that is not one (a pickle, a truncated file) refused as
    :class:`~visadapt.utils.errors.UntrustedFileError` naming the file and why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise _why_not_safetensors(Path(path), err) from err


@contextmanager
def open_safetensors(path: str | os.PathLike, framework: str = "pt") -> Iterator[Any]:
    """``safetensors.safe_open`` with the refusals of :func:`load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework=framework)
    except SafetensorError as err:
        raise _why_not_safetensors(Path(path), err) from err
    with handle:
        yield handle


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 (non-zip) format


def _scan_pickle(f: Any) -> tuple[Any, dict[str, int]]:
    """(the value, if a plain constant, of the pickle at ``f``'s position; {storage key: bytes} its persistent ids
    ``('storage', type, key, location, numel, ...)`` declare), read without building or calling anything.

    A small stack machine over ``pickletools.genops`` that keeps only plain constants, tuples and globals' names;
    every other object is a placeholder."""
    import pickletools

    import torch

    itemsize = {f"torch {name}": dtype.itemsize for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    found: dict[str, int] = {}
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name == "STOP":
            break
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "BINPERSID":
            pid = stack.pop()
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
                found[str(pid[2])] = pid[4] * itemsize.get(pid[1], 1)
            stack.append(None)
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                start = marks.pop()
                items = stack[start:]
                del stack[start - before.index(pickletools.markobject):]
            else:
                items = stack[len(stack) - len(before):] if before else []
                del stack[len(stack) - len(before):]
            if name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                value = tuple(items)
            elif name == "STACK_GLOBAL":
                value = " ".join(map(str, items))
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                value = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name]
            elif name in ("EXT1", "EXT2", "EXT4"):
                value = None
            else:
                value = arg  # numbers, strings, bytes; GLOBAL's "module name"; None for built objects
            stack.extend([value] * len(op.stack_after))
    return (stack[-1] if stack else None), found


def _legacy_storage_bytes(f: Any) -> dict[str, int]:
    """{storage key: bytes} that a legacy (pre-1.6, non-zip) torch file at ``f`` declares, read by
    :func:`_scan_pickle` (nothing is unpickled); {} for another format. The legacy loader allocates each storage
    at its declared size before it reads the data, so the declarations are checked first."""
    if _scan_pickle(f)[0] != _LEGACY_MAGIC:
        return {}
    _scan_pickle(f), _scan_pickle(f)  # the protocol version and the sys info
    return _scan_pickle(f)[1]


def _declared_too_large(path: Path) -> str:
    """Why ``path`` asks for more memory than it holds, or "" when it does not. A torch zip checkpoint stores its
    tensors uncompressed, so its records cannot unpack to more bytes than the file has; a legacy file stores each
    storage after the pickle, so the storages it declares cannot exceed the file either."""
    import zipfile

    size = path.stat().st_size
    if _head(path, 4) == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return ""  # torch.load names a damaged archive itself
        if unpacked > size:
            return f"its zip records unpack to {unpacked} bytes, more than the file's {size} (a zip bomb)"
        return ""
    with open(path, "rb") as f:
        try:
            declared = sum(_legacy_storage_bytes(f).values())
        except Exception:  # noqa: BLE001 - a pickle the scan cannot follow is left to torch.load's own checks
            return ""
    if declared > size:
        return f"its pickle declares tensors of {declared} bytes in a {size}-byte file"
    return ""


def torch_load_weights(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on the CPU: tensors and plain containers only. A pickle that asks for
    anything else ("refusing to unpickle code"), a truncated file, or one that declares more tensor bytes than it
    holds ("array too large": a zip bomb, a forged size; checked before anything is allocated) is refused as
    :class:`~visadapt.utils.errors.UntrustedFileError` naming the file and why."""
    import pickle

    import torch

    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        why = _declared_too_large(Path(path))
        if why:
            raise UntrustedFileError(path, f"array too large: {why}", _REPLACE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), "")
        raise UntrustedFileError(path, "refusing to unpickle code" + (f" ({detail.strip()})" if detail else ""),
                                 _REPLACE) from err
    except (EOFError, RuntimeError) as err:
        text = str(err)
        if isinstance(err, RuntimeError) and any(s in text for s in ("does not match expected size", "wrong byte size",
                                                                      "can't allocate memory")):
            raise UntrustedFileError(path, "array too large: a tensor's declared size is not what the file stores",
                                     _REPLACE) from err
        if isinstance(err, RuntimeError) and not any(s in text for s in ("zip archive", "PytorchStreamReader",
                                                                          "unexpected EOF", "truncated")):
            raise
        raise UntrustedFileError(path, "truncated file (the pickle or zip archive ends early)", _REPLACE) from err
