"""EasyRef training memory (issue 29): references cost memory linearly, through their tokens, and a configuration whose
estimate exceeds the free memory is refused before training with the numbers and the fix."""

import json
import os
import subprocess
import sys

import pytest

from visadapt.cli import main
from visadapt.diffusion.easyref.data import write_demo_groups
from visadapt.diffusion.easyref.memory import PIXEL_COPIES, estimate_step_memory

# Run one stage-3 step (with the fixed evaluation batch before and after) on a group of n + 1 images, so every
# example has n references; print the peak RSS and the estimate's per-reference bytes. An address-space cap keeps a
# regression from taking the machine down.
CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
import torch
torch.set_num_threads(1)
from visadapt.diffusion.easyref.config import EasyRefTrainConfig
from visadapt.diffusion.easyref.train import EasyRefTrainer
data, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = EasyRefTrainConfig(stage=3, data=data, model="tiny-sdxl", mllm="tiny", steps=1, grad_accum=1, max_refs=n,
                         holdout=False, truncate_rate=0.0, ref_drop=0.0, text_drop=0.0, both_drop=0.0, precision="no")
trainer = EasyRefTrainer(cfg, out)
trainer.run()
m = trainer.step_memory
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "per_reference": m.host_per_reference + m.device_per_reference}))
"""


def _peak(tmp_path, n: int) -> dict:
    data = write_demo_groups(tmp_path / f"g{n}", n_groups=1, per_group=n + 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tmp_path / f"run{n}"), str(n)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reference_memory_grows_linearly_with_the_references(tmp_path):
    """From 8 to 32 references the peak grows by at most 1.5 x 24 x the estimate's per-reference bytes (5.4 MiB on
    the tiny models, mostly the pixels of a 336-px reference; measured: 95 MiB in all, 4.0 MiB each). Before the fix
    the fixed evaluation batch ran its 12 examples at once and attention materialised (B, 1, L, L) masks: the peak
    grew by 2.5 GiB (1.4 → 3.9 GiB), and passed 5 GiB at 100 references."""
    small, large = _peak(tmp_path, 8), _peak(tmp_path, 32)
    bound = 1.5 * 24 * large["per_reference"]
    growth = large["maxrss"] - small["maxrss"]
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.0f} MiB from 8 to 32 references (bound "\
                            f"{bound / 2**20:.0f} MiB)"


def test_what_cannot_fit_is_refused_before_training_in_one_line(tmp_path, monkeypatch, capsys, fresh_accelerator):
    from visadapt.diffusion.easyref import memory

    data = write_demo_groups(tmp_path / "groups", n_groups=1, per_group=34)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 100 * 2**20)
    out = tmp_path / "run"
    code = main(["easyref", "train", "--stage", "3", "--data", str(data), "--model", "tiny-sdxl", "--mllm", "tiny",
                 "--max-refs", "30", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.splitlines()[0]
    assert line.startswith("visadapt: error: one training step needs about ") and "GiB of RAM" in line, line
    assert "30 reference(s) per example" in line and "but 0.1 GiB is free" in line, line
    # the references alone need ~5 MiB each, so ~100 MiB leaves room for fewer than 20
    assert "lower --max-refs to " in line and 1 <= int(line.split("lower --max-refs to ")[1].split()[0]) < 20, line
    assert not out.exists()  # refused before the run folder was written


def test_the_estimate_is_linear_in_the_references_and_counts_what_trains():
    from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl

    mllm, _ = tiny_qwen2vl()
    kwargs = dict(image_size=336, batch=1, prompt_tokens=200, max_seq_len=0, num_queries=64, checkpointing=True,
                  act_bytes=2, trainable_params=1000)
    one, ten = (estimate_step_memory(mllm.config, references=n, train_mllm=True, **kwargs) for n in (1, 10))
    assert ten.host - one.host == 9 * one.host_per_reference
    assert ten.device - one.device == 9 * one.device_per_reference
    assert one.host_per_reference == 145 * 4 * 1176 * 4 * PIXEL_COPIES  # 145 tokens of 4 patches of 1176 fp32 values
    frozen = estimate_step_memory(mllm.config, references=10, train_mllm=False, **kwargs)
    assert frozen.device < ten.device and frozen.optimizer == ten.optimizer == 12 * 1000


@pytest.mark.parametrize("causal", [True, False])
def test_unpadded_layers_skip_the_mask_and_match_the_masked_path(causal, monkeypatch):
    """Without padding the layers get SDPA's is_causal flag instead of a (B, 1, L, L) mask; the states are those
    of the masked path (here forced by one padding key appended)."""
    import torch

    from visadapt.diffusion.easyref import encoder as enc
    from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl

    language = tiny_qwen2vl()[0].model.language_model
    x = torch.randn(1, 12, language.config.hidden_size)
    masks = []
    layer = language.layers[0]
    original = layer.forward

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", spy)
    fast = enc._run_layers([layer], language.rotary_emb, x, torch.ones(1, 12), enc._plain_positions(1, 12, "cpu"),
                           causal=causal)
    padded = enc._run_layers([layer], language.rotary_emb, torch.cat([x, torch.randn(1, 1, x.shape[-1])], 1),
                             torch.cat([torch.ones(1, 12), torch.zeros(1, 1)], 1), enc._plain_positions(1, 13, "cpu"),
                             causal=causal)
    assert masks[0] is None and masks[1] is not None and masks[1].shape == (1, 1, 13, 13)
    torch.testing.assert_close(fast, padded[:, :12], atol=1e-5, rtol=1e-5)
