"""TrackingPipeline: save / load round trip (adapters merged) and the official-weights entry point."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from visadapt.pipelines import TrackingPipeline
from visadapt.tracking.model import add_adapter, lorat_adapter_config
from visadapt.tracking.pipeline import _build, variant_config

TINY = dict(vit_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 84}, z_grid=[2, 2],
            x_grid=[4, 4], template_size=28, search_size=56, search_area_factor=4.0)


def frames(n: int = 4) -> list[np.ndarray]:
    out = []
    for t in range(n):
        frame = np.full((90, 120, 3), 40, dtype=np.uint8)
        frame[30 + 2 * t:50 + 2 * t, 20 + 5 * t:44 + 5 * t] = (220, 60, 30)
        out.append(frame)
    return out


def test_saved_pipeline_tracks_like_the_adapted_model(tmp_path):
    torch.manual_seed(0)
    config = variant_config("B-224", **TINY)
    model = add_adapter(_build(config), lorat_adapter_config(r=4, lora_alpha=4))
    pipe = TrackingPipeline(model, config)
    before = pipe(frames(), (20, 30, 24, 20))
    assert before.boxes.shape == (4, 4) and before.scores[0] == 1.0
    assert np.allclose(before.boxes[0], (20, 30, 24, 20))
    pipe.save_pretrained(tmp_path / "tracker")
    assert any("lora" in n for n, _ in model.named_parameters())  # saving merged a copy, not the model
    loaded = TrackingPipeline.from_pretrained(tmp_path / "tracker")
    after = loaded(frames(), (20, 30, 24, 20))
    np.testing.assert_allclose(after.boxes, before.boxes, atol=1e-3)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5)


def test_from_official_loads_every_tensor(tmp_path, monkeypatch):
    import visadapt.tracking.pipeline as pipeline_module

    config = variant_config("B-224", **TINY)
    monkeypatch.setattr(pipeline_module, "variant_config",
                        lambda variant, **overrides: {**config, **overrides})  # tiny stand-in for ViT-B
    state = {k: v + 0.01 for k, v in _build(config).state_dict().items()}  # merged-layout official names
    save_file(state, tmp_path / "base.bin")
    pipe = TrackingPipeline.from_official("B-224", tmp_path / "base.bin")
    # the released weights were trained and tested on the official crops and outside-the-frame reports
    assert (pipe.tracker.crop, pipe.tracker.outside) == ("official", "clipped")
    assert (pipe.config["crop"], pipe.config["outside"]) == ("official", "clipped")  # saved with the pipeline
    for name, value in pipe.model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        TrackingPipeline.from_pretrained(tmp_path)
