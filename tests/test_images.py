import numpy as np
import pytest
from PIL import Image

from vitlora.images import BadImage, load_rgb


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("cmyk.jpg", lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0))),
        ("gray.png", lambda: Image.new("L", (20, 20), 128)),
        ("palette.gif", lambda: Image.new("RGB", (20, 20), (10, 200, 30)).convert("P")),
        ("rgba.png", lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 0))),
        ("bw.png", lambda: Image.new("1", (20, 20), 1)),
        ("deep.png", lambda: Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))),
    ],
)
def test_convertible_images_become_8bit_rgb(tmp_path, name, make):
    image = load_rgb(save(tmp_path, name, make()))
    assert image.mode == "RGB" and image.size == (20, 20)


def test_conversions_keep_the_picture():
    from vitlora.images import to_rgb

    assert to_rgb(Image.new("RGBA", (9, 9), (255, 0, 0, 0))).getpixel((0, 0)) == (
        255,
        255,
        255,
    )  # transparent -> white
    assert to_rgb(Image.new("RGBA", (9, 9), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((9, 9), 32768, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white


def test_unusable_images_raise_bad_image_naming_the_file(tmp_path):
    good = save(tmp_path, "good.jpg", Image.new("RGB", (64, 64), (1, 2, 3)))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    tiny = save(tmp_path, "tiny.png", Image.new("RGB", (1, 1)))
    for path, reason in [
        (truncated, "truncated"),
        (garbage, "not a recognised"),
        (tiny, "too small"),
    ]:
        with pytest.raises(BadImage, match=reason) as error:
            load_rgb(path)
        assert str(path) in str(error.value)


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    bomb = save(tmp_path, "bomb.png", Image.new("1", (9000, 9000)))  # 81 MP, a few KB on disk
    with pytest.raises(BadImage, match="decompression-bomb"):
        load_rgb(bomb)
