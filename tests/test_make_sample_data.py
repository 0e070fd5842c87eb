import re
import sys

import make_sample_data
import numpy as np
import pytest
from PIL import Image


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _gen(path, *extra):
    argv = [str(path), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
            "--min-side", "48", "--max-side", "64", "--workers", "1", *extra]
    assert make_sample_data.main(argv) == 0
    return {p.relative_to(path): p.read_bytes() for p in _files(path)}


def test_layout_names_and_sizes(sample_folder):
    classes = sorted(p.name for p in (sample_folder / "train").iterdir())
    assert len(classes) == 4 and all(re.fullmatch(r"n\d{8}", c) for c in classes)
    assert sorted(p.name for p in (sample_folder / "val").iterdir()) == classes
    for wnid in classes:
        train = list((sample_folder / "train" / wnid).iterdir())
        val = list((sample_folder / "val" / wnid).iterdir())
        assert len(train) == 12 and len(val) == 4
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", p.name) for p in train)
        assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", p.name) for p in val)
    for path in _files(sample_folder / "train")[:8]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 64 <= min(im.size) and max(im.size) <= 96


def test_same_seed_same_bytes(tmp_path):
    a = _gen(tmp_path / "a")
    assert _gen(tmp_path / "b") == a
    c = _gen(tmp_path / "c", "--seed", "1")
    assert {k: v for k, v in c.items() if k.suffix == ".JPEG"} != {k: v for k, v in a.items() if k.suffix == ".JPEG"}


def test_parallel_matches_in_process(tmp_path):
    assert _gen(tmp_path / "a") == _gen(tmp_path / "b", "--workers", "2")


def _chroma(path, rng=None):
    """Mean chromaticity (r, g share of brightness) of the image or of a small random crop, flipped."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
    if rng is not None:
        h, w = a.shape[:2]
        ch, cw = max(8, int(h * 0.3)), max(8, int(w * 0.3))  # ~0.08 of the area, like RandomResizedCrop
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        a = a[y:y + ch, x:x + cw, :][:, ::-1]
    m = a.reshape(-1, 3).mean(0)
    return m[:2] / m.sum()


def test_classes_are_learnable_from_small_flipped_crops(sample_folder):
    # Proxy for "a small model learns it": a nearest-centroid classifier on the colour alone,
    # fitted on train images, must beat chance (25%) by far on small flipped crops of val images.
    classes = sorted(p.name for p in (sample_folder / "train").iterdir())
    centroids = np.stack([np.mean([_chroma(p) for p in (sample_folder / "train" / c).iterdir()], 0)
                          for c in classes])
    rng = np.random.default_rng(0)
    hits = total = 0
    for label, c in enumerate(classes):
        for p in (sample_folder / "val" / c).iterdir():
            for _ in range(3):
                pred = np.argmin(((centroids - _chroma(p, rng)) ** 2).sum(1))
                hits += int(pred == label)
                total += 1
    assert hits / total >= 0.6


def test_default_settings_give_imagenet_like_files():
    s = make_sample_data.Settings()
    sizes = [len(make_sample_data.render((0, label, i), s)) for label in range(2) for i in range(3)]
    assert 50_000 < np.mean(sizes) < 200_000


@pytest.mark.parametrize("bad", [["--classes", "0"], ["--min-side", "100", "--max-side", "50"],
                                 ["--quality", "0"], ["--train-per-class", "0"], ["--workers", "0"]])
def test_bad_arguments_exit_2(tmp_path, capsys, bad):
    assert make_sample_data.main([str(tmp_path / "x"), *bad]) == 2
    assert "error:" in capsys.readouterr().err


def test_refuses_to_overwrite_foreign_folder(tmp_path, capsys):
    (tmp_path / "train" / "mine").mkdir(parents=True)
    (tmp_path / "train" / "mine" / "keep.txt").write_text("precious")
    args = [str(tmp_path), "--classes", "1", "--train-per-class", "1", "--val-per-class", "0",
            "--min-side", "32", "--max-side", "32", "--workers", "1"]
    assert make_sample_data.main(args) == 2
    assert make_sample_data.main(args + ["--overwrite"]) == 2
    assert (tmp_path / "train" / "mine" / "keep.txt").exists()


def _hide(monkeypatch, *packages):
    """Imports of `packages` fail as if they were not installed (None in sys.modules), and the photos load again."""
    for name in packages:
        for module in {name, *(m for m in sys.modules if m.startswith(name + "."))}:
            monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(make_sample_data, "_PHOTOS", [])


def test_without_scikit_image_matplotlibs_photo_serves_and_a_note_says_so(tmp_path, capsys):
    pytest.importorskip("skimage.data", reason="scikit-image is not installed: no photos to tell the fallback from")
    with pytest.MonkeyPatch.context() as mp:
        _hide(mp, "skimage")
        alone = _gen(tmp_path / "a")
        assert _gen(tmp_path / "b") == alone  # still the same bytes for a seed
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        assert len(make_sample_data.load_photos()) == len(make_sample_data.MATPLOTLIB_PHOTOS)
    assert len(notes) == 2 and all("scikit-image is not installed" in line for line in notes)  # one per run
    both = _gen(tmp_path / "c")
    assert "note:" not in capsys.readouterr().err
    assert alone.keys() == both.keys() and alone != both  # the same names from other photos


def test_without_matplotlib_too_it_is_one_line_naming_both(tmp_path, capsys, monkeypatch):
    _hide(monkeypatch, "skimage", "matplotlib")
    assert make_sample_data.main([str(tmp_path / "x"), "--classes", "1", "--workers", "1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "scikit-image" in err[0] and err[0].startswith(
        "make_sample_data: error: ")
    assert not (tmp_path / "x").exists()  # found out before any folder is made
