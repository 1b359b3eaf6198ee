"""Hyperspectral data: .mat loading by key and its errors, whitened PCA, patches, stratified splits, OA/AA/κ."""

import numpy as np
import pytest
import scipy.io
from sklearn.decomposition import PCA as SkPCA
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score
from sklearn.metrics import confusion_matrix as sk_confusion

from visadapt.hyperspectral.data import DatasetLayoutError, PatchSet, Split, fit_pca, load_scene, stratified_split
from visadapt.hyperspectral.metrics import confusion_matrix, scores


def _gt(h=30, w=40, k=5, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k + 1, (h, w))
    gt[0, :k] = np.arange(1, k + 1)  # every class present
    return gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oa_aa_kappa_equal_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    k = 7
    y = rng.integers(0, k, 500)
    pred = np.where(rng.random(500) < 0.6, y, rng.integers(0, k, 500))
    m = confusion_matrix(y, pred, k)
    np.testing.assert_array_equal(m, sk_confusion(y, pred, labels=range(k)))
    s = scores(m)
    assert s["OA"] == pytest.approx(100 * accuracy_score(y, pred))
    assert s["AA"] == pytest.approx(100 * balanced_accuracy_score(y, pred))
    assert s["kappa"] == pytest.approx(100 * cohen_kappa_score(y, pred))
    per_class = [100 * np.mean(pred[y == c] == c) for c in range(k)]
    assert s["per_class_accuracy"] == pytest.approx(per_class)


def test_stratified_split_by_fraction_is_stratified_and_reproducible():
    gt = _gt()
    labelled = int((gt > 0).sum())
    a = stratified_split(gt, 0.1, seed=345)
    b = stratified_split(gt, 0.1, seed=345)
    c = stratified_split(gt, 0.1, seed=7)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    # sklearn's train_test_split sizes: n_test = ceil(0.9 n)
    assert len(a.train) == labelled - int(np.ceil(0.9 * labelled))
    assert len(a.train) + len(a.test) == labelled
    train_labels = gt[a.train[:, 0], a.train[:, 1]]
    for cls in range(1, 6):
        n_c = int((gt == cls).sum())
        assert abs((train_labels == cls).sum() - 0.1 * n_c) < 1.0 + 1e-9
    as_set = lambda rc: {tuple(p) for p in rc}  # noqa: E731
    assert not as_set(a.train) & as_set(a.test)
    assert (gt[a.test[:, 0], a.test[:, 1]] > 0).all()


def test_split_by_count_with_validation_saved_and_reloaded(tmp_path):
    gt = _gt()
    s = stratified_split(gt, 10, seed=1, val=0.2)
    train_labels = gt[s.train[:, 0], s.train[:, 1]]
    val_labels = gt[s.val[:, 0], s.val[:, 1]]
    assert np.bincount(train_labels, minlength=6)[1:].tolist() == [8] * 5
    assert np.bincount(val_labels, minlength=6)[1:].tolist() == [2] * 5
    s.save(tmp_path / "split.json")
    again = Split.load(tmp_path / "split.json", gt)
    for which in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(s, which), getattr(again, which))
    with pytest.raises(ValueError, match="30×40 scene"):
        Split.load(tmp_path / "split.json", gt[:20])
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(gt, 1.5)


def test_mat_file_loads_by_key_and_errors_are_clear(tmp_path):
    rng = np.random.default_rng(0)
    cube, gt = rng.random((12, 10, 20)).astype(np.float32), _gt(12, 10, 3)
    scipy.io.savemat(tmp_path / "scene.mat", {"radiance": cube})
    scipy.io.savemat(tmp_path / "scene_gt.mat", {"labels": gt.astype(np.uint8)})
    scene = load_scene(data=tmp_path / "scene.mat", data_key="radiance", gt=tmp_path / "scene_gt.mat",
                       gt_key="labels")
    assert scene.cube.shape == (12, 10, 20) and scene.cube.dtype == np.float32
    np.testing.assert_array_equal(scene.gt, gt)
    assert scene.num_classes == 3

    with pytest.raises(DatasetLayoutError, match=r"no variable 'cube'.*\['radiance'\]"):
        load_scene(data=tmp_path / "scene.mat", data_key="cube", gt=tmp_path / "scene_gt.mat", gt_key="labels")
    scipy.io.savemat(tmp_path / "small_gt.mat", {"labels": gt[:11].astype(np.uint8)})
    with pytest.raises(ValueError, match=r"12×10 pixels.*11×10"):
        load_scene(data=tmp_path / "scene.mat", data_key="radiance", gt=tmp_path / "small_gt.mat", gt_key="labels")
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    assert load_scene(data=tmp_path / "cube.npy", gt=tmp_path / "gt.npy").cube.shape == (12, 10, 20)


def test_known_dataset_by_file_name_and_key(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    scipy.io.savemat(tmp_path / "data" / "PaviaU.mat", {"paviaU": rng.random((8, 9, 103))})
    with pytest.raises(DatasetLayoutError, match="PaviaU_gt.mat"):
        load_scene("pavia_university", tmp_path)
    scipy.io.savemat(tmp_path / "data" / "PaviaU_gt.mat", {"paviaU_gt": _gt(8, 9, 9).astype(np.uint8)})
    scene = load_scene("pavia_university", tmp_path)
    assert scene.cube.shape == (8, 9, 103) and scene.class_names[1] == "Meadows"
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_scene("paviaX", tmp_path)


def test_whitened_pca_matches_sklearn_and_has_unit_variance():
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(20, 15, 12)) @ rng.normal(size=(12, 12))
    pca = fit_pca(cube, 5)
    z = pca.transform(cube).reshape(-1, 5)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, rtol=1e-5)
    ref = SkPCA(5, whiten=True).fit_transform(cube.reshape(-1, 12))
    np.testing.assert_allclose(np.abs(z), np.abs(ref), atol=1e-4)


def test_patches_are_centred_with_reflect_padding():
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(6, 7, 3)).astype(np.float32)
    coords = np.array([[0, 0], [3, 4], [5, 6]])
    patches = PatchSet(cube, coords, np.array([0, 1, 2]), patch_size=5, norm="none")
    x, y = patches.batch(np.arange(3))
    assert x.shape == (3, 3, 5, 5) and y.tolist() == [0, 1, 2]
    padded = np.pad(cube, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    for (r, c), patch in zip(coords, x.numpy()):
        np.testing.assert_array_equal(patch, padded[r:r + 5, c:c + 5].transpose(2, 0, 1))
        np.testing.assert_array_equal(patch[:, 2, 2], cube[r, c])
    z = PatchSet(cube, coords, None, 5, padding="zero", norm="none").batch(np.arange(1))[0]
    assert (z[0, :, :2, :2] == 0).all()
    band = PatchSet(cube, coords, None, 5, norm="band").batch(np.arange(3))[0]
    np.testing.assert_allclose(band.mean(dim=(2, 3)).numpy(), 0, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        PatchSet(cube, coords, None, 4)


def test_a_file_with_one_variable_needs_no_key_and_bad_files_name_themselves(tmp_path):
    from visadapt.hyperspectral.data import load_array

    cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    scipy.io.savemat(tmp_path / "one.mat", {"radiance": cube})
    np.testing.assert_array_equal(load_array(tmp_path / "one.mat"), cube)
    np.savez(tmp_path / "one.npz", cube=cube)
    np.testing.assert_array_equal(load_array(tmp_path / "one.npz"), cube)
    scipy.io.savemat(tmp_path / "two.mat", {"a": cube, "b": cube})
    with pytest.raises(DatasetLayoutError, match=r"holds several variables \(\['a', 'b'\]\); name one with --data-key"):
        load_array(tmp_path / "two.mat")
    np.savez(tmp_path / "two.npz", a=cube, b=cube)
    with pytest.raises(DatasetLayoutError, match=r"two.npz holds several arrays"):
        load_array(tmp_path / "two.npz")
    data = (tmp_path / "one.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetLayoutError, match=r"cut.mat is not a readable .mat array file: it is truncated"):
        load_array(tmp_path / "cut.mat")
    (tmp_path / "noise.npy").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DatasetLayoutError, match=r"noise.npy is not a readable .npy array file"):
        load_array(tmp_path / "noise.npy")
