"""benchmarks/composition_quality.py: its statistics, its attribute-binding verdict and where it writes."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visadapt.utils.worlds import shapes as world

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "composition_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("composition_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wilson_interval_matches_the_textbook_values(bench):
    assert bench.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert bench.wilson(0, 200) == pytest.approx((0.0, 0.0188), abs=1e-4)
    assert bench.wilson(200, 200)[1] == 1.0 and bench.wilson(0, 0) == (0.0, 1.0)


def test_the_grid_goes_under_out_unless_asked_and_names_rows_and_columns(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path / "run")])
    assert args.grid == tmp_path / "run" / "composition_quality.png"  # never the tracked docs' copy by default
    assert bench.parse_args(["--grid", "docs/x.png"]).grid == Path("docs/x.png")
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "base,nonsense"])
    canvas = Image.new("RGB", (64, 64), (40, 40, 40))
    jobs = [(name, 0, boxes) for name, boxes in bench.LAYOUTS.items()]
    bench.save_grid({"base": [canvas] * 4, "composer": [canvas] * 4}, jobs, args.grid, cols=4)
    grid = np.asarray(Image.open(args.grid).convert("L"))
    assert (grid[:, :100] < 128).any(axis=1).sum() >= 2  # dark text left of the images: the methods' names
    assert (grid[:24] < 128).any()  # and above them: the layouts and seeds


def test_composer_methods_take_modifiers_and_unknown_ones_are_refused(bench):
    assert bench.composer_overrides("composer ds1 -opt") == {"loss_downsample": 1, "latent_optimization": False}
    assert bench.composer_overrides("composer") == {} and bench.composer_overrides("set_adapters") is None
    assert bench.parse_args(["--methods", "composer ds1 step5, injection"]).methods == ["composer ds1 step5",
                                                                                       "injection"]
    assert bench.parse_args(["--methods", "composer  ds1,composer ds1"]).methods == ["composer ds1"]
    assert bench.composer_overrides("composer step5 scene") == {"step_size": 5.0}
    assert bench.scene_prompts("composer step5 scene") and not bench.scene_prompts("composer step5")
    for wrong in ("injection ds1", "composer ds3", "composer -nothing", "composer ds1 ds2", "composer -opt -opt",
                  "composer scene scene", "set_adapters scene"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--methods", wrong])


def test_binding_verdict_tells_bound_from_swapped(bench):
    asked = [("star", "red"), ("circle", "blue")]
    assert bench.bind_verdict(asked, [("circle", "blue"), ("star", "red")]) == {
        "both_shapes": True, "bound": True, "swapped": False}
    assert bench.bind_verdict(asked, [("star", "blue"), ("circle", "red")]) == {
        "both_shapes": True, "bound": False, "swapped": True}
    assert not any(bench.bind_verdict(asked, [("star", "red"), ("square", "blue")]).values())
    assert not any(bench.bind_verdict(asked, [("star", "red")]).values())


def test_two_objects_cuts_each_shape_out_alone(bench):
    rng = np.random.default_rng(0)
    objects = [world.CanvasObject("star", "red", (16.0, 16.0), 9.0),
               world.CanvasObject("square", "blue", (46.0, 46.0), 7.0)]
    crops = bench.two_objects(world.render_canvas(objects, rng))
    assert len(crops) == 2 and all(c.size == (32, 32) for c in crops)
    reds, blues = zip(*((a[..., 0].max() > 150 and a[..., 2].max() < 120, a[..., 2].max() > 150 and
                         a[..., 0].max() < 120) for a in (np.asarray(c, float) for c in crops)))
    assert sorted(reds) == sorted(blues) == [False, True]  # one red crop, one blue: the other shape painted over


def test_summary_counts_images_whose_boxes_both_hold_an_object(bench):
    def box(drawn, placed=False):
        return {"shape": placed, "colour": placed, "placed": placed, "swapped": False, "drawn": drawn}

    images = [[box("hexagon", True), box("heart", True)],  # both placed
              [box("hexagon", True), box("empty")],  # one object: cannot place both
              [box("star"), box("circle")],  # both filled, nothing placed
              [box("empty"), box("empty")]]
    s = bench.summary(images)
    assert s["both_filled"] == 0.5 and s["both_placed"] == 0.25
    assert s["placed_sks_hexagon"] == 0.5 and s["placed_zwx_heart"] == 0.25
    head, row = bench.table({"ds1": images}).splitlines()
    assert row.split()[head.split().index("filled")] == "50.0%"
