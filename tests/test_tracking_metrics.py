"""Tracking metrics on hand-made sequences: invalid frames (official per-dataset rules and our strict one), the
pixel-inclusive IoU, GOT-10k's first-frame rule and its image bound."""

import numpy as np
import pytest
from PIL import Image

from visadapt.tracking.metrics import (
    bound_to_image,
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


def test_strict_protocol_counts_invalid_frames_as_failures():
    gt = [[10, 10, 20, 20], [10, 10, 20, 20], [10, 10, 0, 20], [10, 10, 20, 20]]  # frame 2: no box
    pred = [[10, 10, 20, 20], [15, 10, 20, 20], [10, 10, 20, 20], [60, 60, 20, 20]]
    r = ope_sequence(pred, gt, visible=[True, True, True, False], protocol="strict")  # frame 3 out of view
    iou1 = iou_pixel_inclusive([pred[1]], [gt[1]])[0]  # 300 / 500 = 0.6
    assert iou1 == pytest.approx(0.6)
    # IoUs (1, 0.6, −1, −1): success = 2/4 up to τ < 0.6, 1/4 for 0.6 ≤ τ < 1, 0 at τ = 1 (strict >).
    expected = [0.5] * 12 + [0.25] * 8 + [0.0]
    np.testing.assert_allclose(r["success_curve"], expected)
    assert r["auc"] == pytest.approx(np.mean(expected))
    assert r["precision"] == pytest.approx(0.5)  # CLE 0 and 5 px; the two invalid frames are failures
    assert r["norm_precision"] == pytest.approx(0.25)  # frame 1: 5 px / 20 px = 0.25 > 0.2 fails
    r2 = ope_sequence(pred[:2], gt[:2], protocol="strict")
    assert r2["norm_precision"] == pytest.approx(0.5) and r2["precision"] == 1.0


# Four frames: 0 exact; 1 has no box and is flagged invisible; 2 has a box, flagged invisible (GOT-10k: "absent"),
# and the prediction sits on it; 3 is 5 px off a 20 px box (IoU 300 / 500 = 0.6, normalised error 0.25).
RULE_GT = [[10, 10, 20, 20], [0, 0, 0, 0], [10, 10, 20, 20], [10, 10, 20, 20]]
RULE_PRED = [[10, 10, 20, 20], [200, 200, 20, 20], [10, 10, 20, 20], [15, 10, 20, 20]]
RULE_VISIBLE = [True, False, False, True]


def official_scores(invalid: set, precision_hit: bool, invisible_miss: bool) -> tuple[float, float, float]:
    """(AUC, P@20, normalised P@0.2) of the four frames by the official rule, written out frame by frame: an invalid
    frame has IoU −1; it is a normalised-precision hit, a precision hit only on UAV sets, and both are misses on a
    flagged-invisible frame of LaSOT / VastTrack."""
    iou = [-1.0 if i in invalid else v for i, v in enumerate([1.0, 0.0, 1.0, 0.6])]
    cle_hit = [precision_hit if i in invalid else own for i, own in enumerate([True, False, True, True])]
    norm_hit = [True if i in invalid else own for i, own in enumerate([True, False, True, False])]
    if invisible_miss:
        cle_hit = [h and RULE_VISIBLE[i] for i, h in enumerate(cle_hit)]
        norm_hit = [h and RULE_VISIBLE[i] for i, h in enumerate(norm_hit)]
    auc = np.mean([np.mean([v > t for v in iou]) for t in np.linspace(0, 1, 21)])
    return auc, np.mean(cle_hit), np.mean(norm_hit)


@pytest.mark.parametrize("dataset, invalid, precision_hit, invisible_miss", [
    ("lasot_ext", {1, 2}, False, False),  # flags read; every invalid frame a normalised-precision hit
    ("lasot", {1, 2}, False, True),  # flags read; invisible frames stay misses
    ("VastTrack", {1, 2}, False, True),
    ("uav123", {1}, True, False),  # flags not read; invalid frames hits for precision too
    ("got10k", {1}, False, False),  # absence flags not read: frame 2 is scored as an ordinary frame
    ("tnl2k", {1}, False, False),
])
def test_official_invalid_frame_rules_per_dataset(dataset, invalid, precision_hit, invisible_miss):
    r = ope_sequence(RULE_PRED, RULE_GT, RULE_VISIBLE, dataset=dataset)
    auc, precision, norm_precision = official_scores(invalid, precision_hit, invisible_miss)
    assert (r["auc"], r["precision"], r["norm_precision"]) == pytest.approx((auc, precision, norm_precision))


def test_strict_protocol_reads_every_flag_and_misses_every_invalid_frame():
    for dataset in ("lasot_ext", "uav123", "got10k"):
        r = ope_sequence(RULE_PRED, RULE_GT, RULE_VISIBLE, dataset=dataset, protocol="strict")
        assert (r["precision"], r["norm_precision"]) == (0.5, 0.25)
        assert r["auc"] == pytest.approx(official_scores({1, 2}, False, True)[0])
    with pytest.raises(ValueError, match="protocol"):
        ope_sequence(RULE_PRED, RULE_GT, protocol="loose")


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


def test_got10k_bounds_boxes_to_the_image_as_the_toolkit():
    # Toolkit rule: x → clip(x, 0, W), then w → clip(w, 0, W − x); a box reaching left of the image moves in whole.
    np.testing.assert_allclose(bound_to_image([[-10, 5, 20, 10], [95, 45, 20, 10]], (100, 50)),
                               [[0, 5, 20, 10], [95, 45, 5, 5]])
    gt = [[0, 10, 20, 10], [0, 10, 20, 10], [90, 10, 10, 10]]
    pred = [[0, 10, 20, 10], [-10, 10, 20, 10], [95, 10, 20, 10]]
    bounded = got10k_scores([(pred, gt, None)], sizes=[(100, 50)])
    # frame 1: moved to (0, 10, 20, 10) → IoU 1 (unbounded 100 / 300); frame 2: w 20 → 5, IoU 50 / 100
    assert bounded["ao"] == pytest.approx((1 + 0.5) / 2) and bounded["sr50"] == 0.5
    assert got10k_scores([(pred, gt, None)])["ao"] == pytest.approx((1 / 3 + 50 / 250) / 2)


def test_success_precision_plot_is_a_png(tmp_path):
    runs = {"good": ope_sequence([[0, 0, 10, 10]] * 3, [[0, 0, 10, 10]] * 3),
            "bad": ope_sequence([[4, 0, 10, 10]] * 3, [[0, 0, 10, 10]] * 3)}
    path = tmp_path / "ope.png"
    plot_success_precision(runs, path, title="demo")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 400
