"""LoRAT cropping, template mask, label assignment and losses on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from visadapt.tracking.geometry import (
    CropParams,
    box_from_crop,
    box_to_crop,
    crop_image,
    crop_image_official,
    crop_params,
    jittered_crop_params,
    rasterise,
    template_mask,
)
from visadapt.tracking.losses import giou_loss, lorat_loss, positive_cells


def test_crop_params_follow_the_siamfc_formula():
    p = crop_params(torch.tensor([10.0, 20.0, 30.0, 60.0]), 2.0, 112)  # w 20, h 40, pad (2-1)(20+40)/2 = 30
    s = 112 / math.sqrt(50 * 70)
    assert p.scale == pytest.approx((s, s))
    assert p.translation == pytest.approx((56 - s * 20, 56 - s * 40))
    square = crop_params(torch.tensor([0.0, 0.0, 50.0, 50.0]), 4.0, 224)  # square object: crop side = f·w
    assert box_to_crop(torch.tensor([0.0, 0.0, 50.0, 50.0]), square).tolist() == pytest.approx([84, 84, 140, 140])


def test_frame_to_crop_to_frame_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 500
    boxes = torch.cat((xy, xy + 1 + torch.rand(20, 2, generator=g, dtype=torch.float64) * 200), dim=1)
    for box in boxes:
        p = crop_params(box, 5.0, 378)
        crop_box = box_to_crop(boxes, p)
        torch.testing.assert_close(box_from_crop(crop_box, p), boxes, rtol=0, atol=1e-9)
        centre = (box_to_crop(box, p)[:2] + box_to_crop(box, p)[2:]) / 2
        torch.testing.assert_close(centre, torch.full((2,), 189.0, dtype=torch.float64))


def test_crop_image_samples_at_the_mapped_positions_and_pads_with_the_mean():
    h, w = 40, 60
    ramp = (torch.arange(w, dtype=torch.float64) + 0.5).expand(h, w)  # value = continuous x of the pixel centre
    image = torch.stack((ramp, ramp.T.new_zeros(h, w) + 7, ramp * 2))
    p = crop_params(torch.tensor([20.0, 2.0, 40.0, 22.0]), 2.0, 16)  # crop rows span y ∈ [−8, 32]
    crop = crop_image(image, p)
    u = torch.arange(16, dtype=torch.float64) + 0.5
    src_x, src_y = (u - p.translation[0]) / p.scale[0], (u - p.translation[1]) / p.scale[1]
    inside_y = (src_y > 0.5) & (src_y < h - 0.5)
    inside_x = (src_x > 0.5) & (src_x < w - 0.5)
    rows = inside_y.nonzero().flatten()
    torch.testing.assert_close(crop[0, rows][:, inside_x], src_x[inside_x].expand(len(rows), -1))
    outside_rows = (src_y < -0.5).nonzero().flatten()
    assert len(outside_rows) > 0
    mean = image.mean(dim=(1, 2)).view(3, 1, 1)
    torch.testing.assert_close(crop[:, outside_rows], mean.expand(3, len(outside_rows), 16))


def test_official_crop_resizes_a_whole_pixel_window_and_reports_the_realised_scale():
    # 100×100 image into a 50 px crop at s = 0.37, t = (3.3, −10.2). Official rule per axis: the image spans
    # [t, t + 100 s] in the crop, clipped to [0, 50], widened to whole pixels (floor start, floor(end + 1 − 1e-4));
    # mapped back ((u − t) / s), widened again and clipped to the image. x: [3.3, 40.3] → [3, 41) ← image
    # [−0.81, 101.89] → [0, 100); y: [−10.2, 26.8] → [0, 27) ← image [27.57, 100.54] → [27, 100). Realised scale =
    # window ratio (38 / 100, 27 / 73), shift = crop start − image start · scale.
    image = torch.arange(3 * 100 * 100, dtype=torch.float32).view(3, 100, 100) % 251
    fill = torch.tensor([1.0, 2.0, 3.0])
    out, p = crop_image_official(image, CropParams((0.37, 0.37), (3.3, -10.2), 50), fill)
    assert p.scale == pytest.approx((0.38, 27 / 73)) and p.size == 50
    assert p.translation == pytest.approx((3.0, -27 * 27 / 73))
    window = torch.nn.functional.interpolate(image[None, :, 27:100, 0:100], (27, 38), mode="bilinear",
                                             align_corners=False)[0]
    torch.testing.assert_close(out[:, 0:27, 3:41], window)
    outside = torch.ones(50, 50, dtype=torch.bool)
    outside[0:27, 3:41] = False
    assert torch.equal(out[:, outside], fill[:, None].expand(3, int(outside.sum())))
    # the realised scale differs from the asked one by 2.7 % here; a crop missing the image is all padding
    missed, q = crop_image_official(image, CropParams((0.37, 0.37), (60.0, 0.0), 50), fill)
    assert torch.equal(missed, fill.view(3, 1, 1).expand(3, 50, 50)) and q.translation == (60.0, 0.0)


def test_rasterise_counts_every_touched_cell_and_clips():
    mask = rasterise(torch.tensor([1.2, 0.0, 2.0, 1.5]), (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1] = True  # x: [floor 1.2, floor(2 + 1 − 1e-4)) = [1, 2); y: [0, floor(2.5 − 1e-4)) = [0, 2)
    assert torch.equal(mask, expected)
    clipped = rasterise(torch.tensor([-3.0, 2.5, 9.0, 9.0]), (4, 4))
    assert clipped[2:].all() and not clipped[:2].any()


def test_template_mask_uses_the_patch_stride():
    mask = template_mask(torch.tensor([14.0, 14.0, 42.0, 30.0]), 112, (8, 8))  # cells x [1, 3), y [1, 3)
    assert mask.dtype == torch.int64 and mask.sum() == 4 and mask[1:3, 1:3].all()


def test_positives_are_the_cells_the_gt_touches():
    pos = positive_cells(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.6, 0.9]]), (2, 2))
    assert pos[0].tolist() == [[True, False], [False, False]]
    assert pos[1].tolist() == [[True, True], [True, True]]


def test_losses_on_a_hand_computed_case():
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # one positive: cell (0, 0)
    boxes = torch.zeros(1, 2, 2, 4)
    boxes[..., 2:] = 1.0
    boxes[0, 0, 0] = torch.tensor([0.0, 0.0, 0.25, 0.5])  # IoU 0.5 with the GT, hull = GT, so GIoU 0.5
    score = torch.zeros(1, 2, 2)
    score[0, 0, 0] = 2.0
    out = lorat_loss({"score_map": score, "boxes": boxes}, gt)
    cls = (math.log1p(math.exp(2.0)) - 2.0 * 0.5) + 3 * math.log(2)  # soft target 0.5 there, 0 elsewhere
    assert out["cls"].item() == pytest.approx(cls, rel=1e-6)
    assert out["reg"].item() == pytest.approx(0.5, rel=1e-6)
    assert out["loss"].item() == pytest.approx(cls + 0.5, rel=1e-6)
    halved = lorat_loss({"score_map": score, "boxes": boxes}, gt, num_positives=torch.tensor(2.0))
    assert halved["loss"].item() == pytest.approx((cls + 0.5) / 2, rel=1e-6)


def test_giou_of_disjoint_boxes_exceeds_one():
    loss = giou_loss(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 3.0, 1.0]))
    assert loss.item() == pytest.approx(1 + (3 - 2) / 3)  # IoU 0, hull 3, union 2


def test_jittered_crop_follows_the_official_draws_and_gives_up_after_twelve():
    box = torch.tensor([100.0, 80.0, 160.0, 110.0])  # w 60, h 30
    p = jittered_crop_params(box, 4.0, 224, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    s0 = crop_params(box, 4.0, 224).scale[0]
    scale = s0 / np.exp(rng.standard_normal(2) * 0.25)
    shift = 112 - np.array([130.0, 95.0]) * scale + rng.uniform(-1, 1, 2) * (60 * scale[0] + 30 * scale[1]) * 1.5
    out = box_to_crop(box.double(), p).clamp(0, 224)
    assert (out[2:] - out[:2]).min() >= 10
    # With seed 3 the first draw is accepted, so the result is exactly the formula's.
    assert p.scale == pytest.approx(tuple(scale)) and p.translation == pytest.approx(tuple(shift))
    assert p.scale[0] != p.scale[1]  # anisotropic
    rng = np.random.default_rng(0)
    assert jittered_crop_params(box, 4.0, 224, rng, min_object_size=500) is None
    consumed = np.random.default_rng(0)
    for _ in range(12):
        consumed.standard_normal(2), consumed.uniform(-1, 1, 2)
    assert rng.random() == consumed.random()  # exactly 12 draws were made
