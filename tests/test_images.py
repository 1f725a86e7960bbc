import io

import numpy as np
import pytest
from PIL import Image

from vqa.data import DataError, load_image, pad_to_aspect_ratio


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_becomes_rgb(tmp_path, mode):
    image = Image.new(mode, (20, 10))
    path = _save(tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}", image)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_transparency_lands_on_white(tmp_path):
    path = _save(tmp_path / "t.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_saturated(tmp_path):
    array = np.full((4, 4), 1000, dtype=np.uint16)
    array[0, 0] = 2000
    path = _save(tmp_path / "d.png", Image.fromarray(array))
    loaded = load_image(path)
    assert loaded.getpixel((0, 0))[0] == 255 and 120 <= loaded.getpixel((1, 1))[0] <= 130


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = _save(tmp_path / "e.jpg", image, exif=exif)
    assert load_image(path).size == (10, 30)


def test_tiny_and_non_ascii_images(tmp_path):
    path = _save(tmp_path / "이미지_1x1.png", Image.new("RGB", (1, 1)))
    assert load_image(path).size == (1, 1)


@pytest.mark.parametrize("content, message", [
    (b"", "not an image"),
    (b"hello, not an image", "not an image"),
])
def test_broken_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_and_missing_files(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(DataError, match="unreadable image"):
        load_image(path)
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "gone.png")


def test_decompression_bombs_stay_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", Image.new("L", (200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 px > 2 x 1,000: a bomb
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("size, padded", [((3000, 10), (3000, 15)), ((7, 2000), (10, 2000)),
                                          ((400, 2), (400, 2)), ((64, 64), (64, 64))])
def test_strips_beyond_200_to_1_are_padded_not_cut(tmp_path, size, padded):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = Image.new("RGB", size, (255, 0, 0))
    path = _save(tmp_path / "strip.png", image)
    loaded = load_image(path)
    assert loaded.size == padded
    width, height = loaded.size
    smart_resize(height, width, min_pixels=56 * 56, max_pixels=448 * 448)  # Qwen's rule accepts it
    # The picture itself is intact, centred on white.
    red = np.all(np.asarray(loaded) == (255, 0, 0), axis=-1)
    assert red.sum() == size[0] * size[1]
    assert pad_to_aspect_ratio(loaded) is loaded  # already within the limit: untouched
