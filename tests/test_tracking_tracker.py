"""LoRAT tracker: Hann-window decoding by hand, and the loop on a synthetic sequence with a tiny model."""

import numpy as np
import pytest
import timm
import torch

from visadapt.tracking.geometry import CropParams, crop_image_official, crop_params, normalize
from visadapt.tracking.model import LoRAT
from visadapt.tracking.tracker import Tracker, decode_best, hann_window


def test_hann_window_is_symmetric_and_peaks_in_the_centre():
    w = hann_window((5, 5))
    assert w[2, 2] == 1 and w[0].abs().max() == 0 and torch.equal(w, w.flip(0))


def test_decoding_prefers_the_centre_unless_the_score_outweighs_the_window():
    boxes = torch.arange(25 * 4, dtype=torch.float32).view(5, 5, 4)
    logits = torch.zeros(5, 5)
    logits[0, 0] = 20.0  # p ≈ 1 at a corner: 0.55 · 1 + 0.45 · 0 = 0.55 < 0.55 · 0.5 + 0.45 = 0.725 at the centre
    box, score, index = decode_best(logits, boxes)
    assert index == 12 and score == pytest.approx(0.5) and torch.equal(box, boxes[2, 2])
    logits[2, 3] = 3.0  # next to the centre (window 0.5): 0.55 · 0.953 + 0.45 · 0.5 = 0.749 > 0.725
    assert decode_best(logits, boxes)[2] == 13
    assert decode_best(logits, boxes, window_influence=0.0)[2] == 0  # no window: the raw argmax


def test_tracker_runs_on_a_synthetic_sequence_and_stays_in_the_frame():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=84, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                                        init_values=1e-5, num_classes=0)
    tracker = Tracker(LoRAT(vit, (2, 2), (4, 4)), template_size=28, search_size=56, search_area_factor=4.0)
    frames = []
    for t in range(6):
        frame = np.full((90, 120, 3), 40, dtype=np.uint8)
        frame[30 + 2 * t:50 + 2 * t, 20 + 5 * t:44 + 5 * t] = (220, 60, 30)
        frames.append(frame)
    tracker.init(frames[0], (20, 30, 24, 20))
    for frame in frames[1:]:
        (x, y, w, h), score = tracker.track(frame)
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 120 and y + h <= 90
        assert 0 < score < 1
    with pytest.raises(ValueError, match="for_variant"):
        Tracker(tracker.model, 28, 70, 4.0)


def test_tracker_runs_a_bfloat16_model_on_float_frames():
    """Crops are float32; a half-precision model must get its own dtype (it used to fail in the patch embedding)."""
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=84, patch_size=14, embed_dim=32, depth=1, num_heads=2,
                                        init_values=1e-5, num_classes=0)
    tracker = Tracker(LoRAT(vit, (2, 2), (4, 4)).to(torch.bfloat16), template_size=28, search_size=56,
                      search_area_factor=4.0)
    frame = np.full((90, 120, 3), 40, dtype=np.uint8)
    frame[30:50, 20:44] = (220, 60, 30)
    tracker.init(frame, (20, 30, 24, 20))
    (x, y, w, h), score = tracker.track(frame)
    assert w > 0 and h > 0 and 0 <= score <= 1


def _tiny_tracker(**kwargs) -> Tracker:
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=84, patch_size=14, embed_dim=32, depth=1, num_heads=2,
                                        init_values=1e-5, num_classes=0)
    return Tracker(LoRAT(vit, (2, 2), (4, 4)), template_size=28, search_size=56, search_area_factor=4.0, **kwargs)


def test_a_prediction_outside_the_frame_is_reported_clipped_officially_or_as_the_previous_box():
    # Every cell predicts crop box (0.1, 0.1, 0.3, 0.3) · 56 px; the crop sits 100 px right of the frame's origin
    # (u = x + 100), so the box is x ∈ [−94.4, −83.2]: wholly left of the 120×90 frame. Official: report the box
    # clipped to the frame, x1 = x2 = 0 (zero area), and keep searching around the previous box.
    boxes = torch.tensor([0.1, 0.1, 0.3, 0.3]).expand(4, 4, 4)
    params = CropParams((1.0, 1.0), (100.0, 0.0), 56)
    state = torch.tensor([10.0, 10.0, 30.0, 40.0], dtype=torch.float64)
    for outside, reported in (("clipped", [0, 5.6, 0, 16.8]), ("previous", state.tolist())):
        new_state, box, _ = _tiny_tracker(outside=outside).update(torch.zeros(4, 4), boxes, params, state, (90, 120))
        assert torch.equal(new_state, state)
        np.testing.assert_allclose(box.numpy(), reported, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        _tiny_tracker(outside="keep")


def test_official_crops_map_boxes_with_the_realised_parameters():
    frame = torch.rand(3, 90, 121) * 255
    official, exact = _tiny_tracker(crop="official"), _tiny_tracker()
    state = torch.tensor([20.3, 30.7, 44.1, 50.2], dtype=torch.float64)
    x, p = official.search(frame, state, frame.mean(dim=(1, 2)))
    asked = crop_params(official._search_box(state), 4.0, 56)
    expected, realised = crop_image_official(frame, asked, frame.mean(dim=(1, 2)))
    assert p == realised and p != asked and x.shape == (3, 56, 56)
    torch.testing.assert_close(x, normalize(expected))
    assert exact.search(frame, state, frame.mean(dim=(1, 2)))[1] == asked
