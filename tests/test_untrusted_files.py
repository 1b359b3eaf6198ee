"""Untrusted weight, checkpoint and dataset files are refused with one error naming the file and why, never run.

The evil files carry a ``__reduce__`` that would create a marker file through ``os.system``; every test checks the
marker is never there (the refusal happens before anything in the file is called).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from visadapt.utils import UntrustedFileError, load_safetensors, open_safetensors, torch_load_weights


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _HugeArray:
    """Pickles as numpy's own array reduce, asking for a 10 TB uint8 array with an empty buffer."""

    def __reduce__(self):
        return (np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (10 ** 13,), np.dtype("u1"), False, b""))


class _HugeObjectArray:
    def __reduce__(self):
        return (np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (10 ** 12,), np.dtype("O"), False, []))


class _Codecs:
    def __reduce__(self):
        import _codecs

        return _codecs.encode, ("x", "rot13")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the pickle's code ran"


def _raw_pickle(path, marker):
    path.write_bytes(pickle.dumps({"w": _Evil(marker)}))
    return path


def _zip_pickle(path, marker):
    torch.save({"w": _Evil(marker)}, path)
    return path


def _truncated(path, writer):
    writer(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _good_safetensors(path):
    save_file({"w": torch.zeros(64)}, str(path))


def _good_torch(path):
    torch.save({"w": torch.zeros(64)}, path)


# ------------------------------------------------------------------------------------------------------ the loaders
@pytest.mark.parametrize("make", [_raw_pickle, _zip_pickle])
def test_load_safetensors_refuses_a_pickle(tmp_path, marker, make):
    path = make(tmp_path / "model.safetensors", marker)
    with pytest.raises(UntrustedFileError, match=r"model\.safetensors: not a safetensors file"):
        load_safetensors(path)
    with pytest.raises(UntrustedFileError, match="not a safetensors file"):
        with open_safetensors(path):
            pass


def test_load_safetensors_names_a_truncated_file(tmp_path):
    path = _truncated(tmp_path / "state.safetensors", _good_safetensors)
    with pytest.raises(UntrustedFileError, match=r"state\.safetensors: truncated"):
        load_safetensors(path)


@pytest.mark.parametrize("make", [_raw_pickle, _zip_pickle])
def test_torch_load_weights_refuses_code(tmp_path, marker, make):
    path = make(tmp_path / "evil.bin", marker)
    with pytest.raises(UntrustedFileError, match=r"evil\.bin: refusing to unpickle code"):
        torch_load_weights(path)


def test_torch_load_weights_names_a_truncated_file(tmp_path):
    path = _truncated(tmp_path / "weights.bin", _good_torch)
    with pytest.raises(UntrustedFileError, match=r"weights\.bin: truncated"):
        torch_load_weights(path)


def test_good_files_still_load(tmp_path):
    _good_safetensors(tmp_path / "a.safetensors")
    _good_torch(tmp_path / "a.bin")
    assert load_safetensors(tmp_path / "a.safetensors")["w"].shape == (64,)
    assert torch_load_weights(tmp_path / "a.bin")["w"].shape == (64,)


def _legacy_torch(path, numel, stored):
    """A file in torch's pre-1.6 (non-zip) format holding {"w": a uint8 tensor}, written by hand so that its
    storage can declare ``numel`` bytes while ``stored`` bytes follow the pickle."""
    import collections
    import struct
    import sys

    class _Storage:
        pass

    storage = _Storage()

    class _Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, (numel,), (1,), False, collections.OrderedDict())

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.ByteStorage, "0", "cpu", numel, None) if obj is storage else None

    info = {"protocol_version": 1001, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 8}}
    with open(path, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001, info):
            pickle.dump(head, f, protocol=2)
        _Pickler(f, protocol=2).dump({"w": _Tensor()})
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", len(stored)) + stored)
    return path


def _rezipped(path, compress, replace=None):
    """``path`` (a torch zip) rewritten with every record compressed by ``compress``, and the record whose name
    ends with a key of ``replace`` replaced by its bytes."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in records:
            data = next((new for end, new in (replace or {}).items() if info.filename.endswith(end)), data)
            info.compress_type = compress
            archive.writestr(info, data)
    return path


def test_torch_load_weights_refuses_a_zip_bomb_before_inflating(tmp_path):
    """64 MiB of zeros deflated to a 64 KiB file: torch would inflate (and allocate) all of it."""
    import zipfile

    path = tmp_path / "bomb.bin"
    torch.save({"w": torch.zeros(64 << 20, dtype=torch.uint8)}, path)
    _rezipped(path, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(UntrustedFileError, match=r"bomb\.bin: array too large: its zip records unpack to \d+ bytes"):
        torch_load_weights(path)


def test_torch_load_weights_refuses_a_legacy_file_declaring_10_tb(tmp_path):
    path = _legacy_torch(tmp_path / "huge.bin", 10 ** 13, b"\0" * 7)
    with pytest.raises(UntrustedFileError, match=r"huge\.bin: array too large: its pickle declares tensors of "
                                                 r"10000000000000 bytes"):
        torch_load_weights(path)


def test_torch_load_weights_refuses_a_tensor_larger_than_its_record(tmp_path):
    import zipfile

    path = tmp_path / "short.bin"
    torch.save({"w": torch.zeros(64, dtype=torch.uint8)}, path)
    _rezipped(path, zipfile.ZIP_STORED, {"/data/0": b"\0" * 3})
    with pytest.raises(UntrustedFileError, match=r"short\.bin: array too large"):
        torch_load_weights(path)


def test_honest_legacy_and_compressed_files_still_load(tmp_path):
    """The size checks pass what torch writes: a legacy file, and a zip whose compressed records fit the file."""
    import zipfile

    legacy = _legacy_torch(tmp_path / "legacy.bin", 7, bytes(range(7)))
    assert torch_load_weights(legacy)["w"].tolist() == list(range(7))
    torch.save({"w": torch.arange(64.0)}, tmp_path / "saved.bin", _use_new_zipfile_serialization=False)
    assert torch_load_weights(tmp_path / "saved.bin")["w"].shape == (64,)
    noise = _rezipped(_good_torch(tmp_path / "noise.bin") or tmp_path / "noise.bin", zipfile.ZIP_DEFLATED)
    assert torch_load_weights(noise)["w"].shape == (64,)


# ------------------------------------------------------------------------------------------------------ the callers
@pytest.mark.parametrize("make", [_raw_pickle, _zip_pickle])
def test_tracking_official_weights_refuse_code(tmp_path, marker, make):  # track eval|run --weights
    from visadapt.tracking.checkpoint import read_state_dict

    with pytest.raises(UntrustedFileError, match="evil.bin: refusing to unpickle code"):
        read_state_dict(make(tmp_path / "evil.bin", marker))


def test_tracking_official_weights_truncated(tmp_path):
    from visadapt.tracking.checkpoint import read_state_dict

    with pytest.raises(UntrustedFileError, match="truncated"):
        read_state_dict(_truncated(tmp_path / "base.bin", _good_torch))


def test_easyref_files_refuse_pickles(tmp_path, marker):  # easyref train --init / eval --adapter
    from visadapt.diffusion.easyref.files import read_easyref_file

    with pytest.raises(UntrustedFileError, match="evil.bin: refusing to unpickle code"):
        read_easyref_file(_zip_pickle(tmp_path / "evil.bin", marker))
    with pytest.raises(UntrustedFileError, match="easyref.safetensors: not a safetensors file"):
        read_easyref_file(_raw_pickle(tmp_path / "easyref.safetensors", marker))


def test_hf_vit_folder_refuses_a_pickled_bin(tmp_path, marker):  # --backbone hf-vit:DIR
    from visadapt.incremental.model import _hf_files

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _zip_pickle(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UntrustedFileError, match="pytorch_model.bin: refusing to unpickle code"):
        _hf_files(str(tmp_path))


def test_trainer_resume_refuses_a_pickled_checkpoint(tmp_path, marker):  # --resume, visadapt/training.py
    from visadapt.training import load_checkpoint

    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "param_groups": []}))
    _raw_pickle(tmp_path / "state.safetensors", marker)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UntrustedFileError, match="state.safetensors: not a safetensors file"):
        load_checkpoint(tmp_path, optimizer)


# ------------------------------------------------------------------------------------------------------- CIFAR-100
def _cifar(root, meta_value):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": meta_value}, f)
    return folder / "meta"


@pytest.mark.parametrize("payload, global_name", [(None, "posix.system"), (_Codecs(), "_codecs.encode")])
def test_cifar_refuses_code(tmp_path, marker, payload, global_name):
    from visadapt.incremental.data import load_dataset

    _cifar(tmp_path, payload if payload is not None else _Evil(marker))
    with pytest.raises(UntrustedFileError, match=rf"meta: refusing to unpickle code \({global_name}"):
        load_dataset("cifar100", str(tmp_path))


def test_cifar_names_a_truncated_file(tmp_path):
    from visadapt.incremental.data import load_dataset

    meta = _cifar(tmp_path, [b"apple"])
    meta.write_bytes(meta.read_bytes()[:-5])
    with pytest.raises(UntrustedFileError, match="meta: truncated"):
        load_dataset("cifar100", str(tmp_path))


@pytest.mark.parametrize("huge", [_HugeArray(), _HugeObjectArray()])
def test_cifar_refuses_a_huge_array_before_allocating(tmp_path, huge):
    from visadapt.incremental.data import load_dataset

    _cifar(tmp_path, huge)
    with pytest.raises(UntrustedFileError, match="meta: array too large"):
        load_dataset("cifar100", str(tmp_path))


# --------------------------------------------------------------------------------------------------- through the CLI
def test_cli_prints_one_line_naming_the_file(tmp_path, marker, capsys):
    from visadapt.cli import main

    evil = _zip_pickle(tmp_path / "evil.bin", marker)
    code = main(["track", "eval", "--variant", "B-224", "--weights", str(evil), "--data",
                 f"got10k:{tmp_path / 'none'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert str(evil) in first and "refusing to unpickle code" in first


def test_cli_track_eval_run_folder_with_a_pickled_model_file(tmp_path, marker, capsys):
    from visadapt.cli import main
    from visadapt.tracking.config import TrackConfig
    from visadapt.tracking.pipeline import TrackingPipeline
    from visadapt.tracking.train import build_model, model_config

    cfg = TrackConfig(variant="demo", r=4, lora_alpha=8.0)
    model, _ = build_model(cfg)
    run = tmp_path / "run"
    TrackingPipeline(model, model_config(cfg)).save_pretrained(run)
    _raw_pickle(run / "model.safetensors", marker)
    code = main(["track", "eval", str(run), "--data", f"got10k:{tmp_path / 'none'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{run / 'model.safetensors'}: not a safetensors file" in err.splitlines()[0]
