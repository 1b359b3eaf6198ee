"""Tracking metrics on hand-made sequences: invalid frames, the pixel-inclusive IoU, GOT-10k's first-frame rule."""

import numpy as np
import pytest
from PIL import Image

from visadapt.tracking.metrics import (
    got10k_scores,
    iou_continuous,
    iou_pixel_inclusive,
    ope_dataset,
    ope_sequence,
    plot_success_precision,
)


def test_pixel_inclusive_and_continuous_iou():
    # 10×10 boxes offset by 5 px: inclusive ends [0, 9] and [5, 14] share 5 columns → 50 / 150.
    assert iou_pixel_inclusive([[0, 0, 10, 10]], [[5, 0, 10, 10]])[0] == pytest.approx(50 / 150)
    # Touching boxes share one pixel column in the inclusive convention, none in the continuous one.
    assert iou_pixel_inclusive([[0, 0, 10, 10]], [[9, 0, 10, 10]])[0] == pytest.approx(10 / 190)
    assert iou_continuous([[0, 0, 10, 10]], [[10, 0, 10, 10]])[0] == 0


def test_ope_counts_invalid_frames_as_failures():
    gt = [[10, 10, 20, 20], [10, 10, 20, 20], [10, 10, 0, 20], [10, 10, 20, 20]]  # frame 2: no box
    pred = [[10, 10, 20, 20], [15, 10, 20, 20], [10, 10, 20, 20], [60, 60, 20, 20]]
    r = ope_sequence(pred, gt, visible=[True, True, True, False])  # frame 3 out of view
    iou1 = iou_pixel_inclusive([pred[1]], [gt[1]])[0]  # 300 / 500 = 0.6
    assert iou1 == pytest.approx(0.6)
    # IoUs (1, 0.6, −1, −1): success = 2/4 up to τ < 0.6, 1/4 for 0.6 ≤ τ < 1, 0 at τ = 1 (strict >).
    expected = [0.5] * 12 + [0.25] * 8 + [0.0]
    np.testing.assert_allclose(r["success_curve"], expected)
    assert r["auc"] == pytest.approx(np.mean(expected))
    assert r["precision"] == pytest.approx(0.5)  # CLE 0 and 5 px; the two invalid frames are failures
    assert r["norm_precision"] == pytest.approx(0.25)  # frame 1: 5 px / 20 px = 0.25 > 0.2 fails
    r2 = ope_sequence(pred[:2], gt[:2])
    assert r2["norm_precision"] == pytest.approx(0.5) and r2["precision"] == 1.0


def test_dataset_score_is_the_mean_over_sequences():
    a = ope_sequence([[0, 0, 10, 10]] * 2, [[0, 0, 10, 10]] * 2)
    b = ope_sequence([[50, 50, 10, 10]] * 4, [[0, 0, 10, 10]] * 4)
    d = ope_dataset([a, b])
    assert d["auc"] == pytest.approx((a["auc"] + b["auc"]) / 2) and d["precision"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one box per frame"):
        ope_sequence([[0, 0, 1, 1]], [[0, 0, 1, 1]] * 2)


def test_got10k_excludes_the_first_frame_and_invisible_frames():
    gt = [[0, 0, 10, 10]] * 4
    pred = [[100, 100, 10, 10], [0, 0, 10, 10], [5, 0, 10, 10], [100, 100, 10, 10]]
    r = got10k_scores([(pred, gt, [True, True, True, False]), ([[0, 0, 10, 10]] * 2, gt[:2], None)])
    # frame 0 (a miss) is ignored, frame 3 (a miss) is invisible: IoUs 1, 1/3 and the second sequence's 1.
    assert r["frames"] == 3
    assert r["ao"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert r["sr50"] == pytest.approx(2 / 3) and r["sr75"] == pytest.approx(2 / 3)


def test_success_precision_plot_is_a_png(tmp_path):
    runs = {"good": ope_sequence([[0, 0, 10, 10]] * 3, [[0, 0, 10, 10]] * 3),
            "bad": ope_sequence([[4, 0, 10, 10]] * 3, [[0, 0, 10, 10]] * 3)}
    path = tmp_path / "ope.png"
    plot_success_precision(runs, path, title="demo")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 400
