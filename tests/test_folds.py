"""FOLDS=K (vqa/folds.py): images grouped by their decoded pixels, folds that never share an
image, every training row out of fold exactly once, the assignment made once."""

import json

import pandas as pd
import pytest
from PIL import Image

from vqa.config import ConfigError, load_config
from vqa.folds import assign_folds, fold_assignment, fold_config, image_groups, pixel_digest


def _picture(seed: int) -> Image.Image:
    import random

    rng = random.Random(seed)
    image = Image.new("RGB", (32, 24))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                   for _ in range(32 * 24)])
    return image


def test_lossless_copies_share_a_digest_and_lossy_or_other_pictures_do_not(tmp_path):
    picture = _picture(0)
    picture.save(tmp_path / "one.png")
    picture.save(tmp_path / "copy.bmp")  # another name and format, the same pixels
    picture.save(tmp_path / "again.jpg", quality=90)  # lossy: the documented miss
    _picture(1).save(tmp_path / "other.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    digest = pixel_digest(tmp_path, "one.png")
    assert digest == pixel_digest(tmp_path, "copy.bmp")
    assert digest != pixel_digest(tmp_path, "again.jpg")
    assert digest != pixel_digest(tmp_path, "other.png")
    assert pixel_digest(tmp_path, "broken.png") is None


def _frame(images: int, rows_per_image: int) -> tuple[pd.DataFrame, dict[str, str]]:
    rows, groups = [], {}
    for image in range(images):
        for q in range(rows_per_image):
            row_id = f"{image}-{q}"
            rows.append({"id": row_id, "answer": "abcd"[(image + q) % 4]})
            groups[row_id] = f"img{image}"
    return pd.DataFrame(rows), groups


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_never_share_an_image_and_hold_every_row_out_once(k):
    frame, groups = _frame(images=120, rows_per_image=3)
    folds = assign_folds(frame, groups, k, seed=42)
    assert sorted(folds) == sorted(frame["id"])  # every row in exactly one fold
    assert set(folds.values()) == set(range(k))
    fold_of_image = {}
    for row_id, fold in folds.items():
        assert fold_of_image.setdefault(groups[row_id], fold) == fold  # never split
    sizes = pd.Series(folds).value_counts()
    assert sizes.max() - sizes.min() <= 3 * 2  # balanced to within a couple of images
    shares = frame.assign(fold=frame["id"].map(folds)).groupby("fold")["answer"].value_counts(
        normalize=True)
    assert (shares - 0.25).abs().max() < 0.1  # stratified by answer
    assert folds != assign_folds(frame, groups, k, seed=7)  # the seed matters


def test_too_few_images_for_the_folds_is_one_line():
    from vqa.data import DataError

    frame, groups = _frame(images=2, rows_per_image=5)
    with pytest.raises(DataError, match="FOLDS=3 needs at least 3 distinct images; it has 2"):
        assign_folds(frame, groups, 3, seed=0)


def test_the_assignment_groups_copies_and_is_made_once(small_data, tmp_path):
    """Two rows naming byte-different files of the same pixels land in one fold; folds.json
    is read back while its inputs hold, and made again when an image changes."""
    Image.open(small_data / "images" / "0.png").save(small_data / "images" / "0-copy.bmp")
    train = pd.read_csv(small_data / "train.csv", dtype=str)
    train.loc[1, "path"] = "images/0-copy.bmp"  # tr1 now shows tr0's picture
    train.to_csv(small_data / "train.csv", index=False)
    config = load_config([f"DATA_DIR={small_data}", f"ARTIFACTS_DIR={tmp_path / 'run'}",
                          "FOLDS=2"], environ={})
    groups = image_groups(train, small_data)
    assert groups["tr0"] == groups["tr1"] != groups["tr2"]
    folds = fold_assignment(config)
    assert folds["tr0"] == folds["tr1"] and sorted(folds) == sorted(train["id"])
    saved = json.loads((tmp_path / "run" / "folds.json").read_text())
    assert saved["folds"] == folds and saved["summary"]["images_with_several_rows"] >= 1
    # a fold's own run (FOLD=k in its folder) reads the same assignment
    assert fold_assignment(fold_config(config, 1)) == folds
    (tmp_path / "run" / "folds.json").write_text(json.dumps({**saved, "folds": {"x": 0}}))
    assert fold_assignment(config) == {"x": 0}  # read, not made again
    Image.new("RGB", (64, 64), (1, 2, 3)).save(small_data / "images" / "5.png")
    assert sorted(fold_assignment(config)) == sorted(folds)  # made again: every row
    assert json.loads((tmp_path / "run" / "folds.json").read_text())["folds"] != {"x": 0}


def test_fold_settings_are_checked():
    assert load_config(["FOLDS=5"], environ={}).folds == 5
    with pytest.raises(ConfigError, match="FOLDS=1: must be 0"):
        load_config(["FOLDS=1"], environ={})
    with pytest.raises(ConfigError, match="FOLD=3: needs FOLDS=K and must lie in 0..K-1"):
        load_config(["FOLDS=3", "FOLD=3"], environ={})


def test_the_scripts_run_every_fold_under_folds_and_one_run_otherwise():
    from vqa.fold_runs import per_fold

    stage = per_fold(lambda c: "one run", lambda c: "every fold")
    assert stage(load_config([], environ={})) == "one run"
    assert stage(load_config(["FOLDS=3"], environ={})) == "every fold"
    assert stage(load_config(["FOLDS=3", "FOLD=2"], environ={})) == "one run"  # fold 2's own
