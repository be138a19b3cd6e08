"""Image folders for the image-folder tests (tf.data and grain): solid-colour
images, one colour per file, so every crop tells which file it came from."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette_sample"


def colour(i):
    """A distinct, JPEG-robust RGB colour for file i (steps of 40 per channel)."""
    return (40 * (i % 6) + 20, 40 * ((i // 6) % 6) + 20, 40 * (i // 36) + 20)


def _save(path, i, mode="RGB", fmt=None, size=(24, 16)):
    img = Image.new("RGB", size, colour(i))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(128)
    img.save(path, format=fmt, quality=98) if fmt == "JPEG" else img.save(path, format=fmt)


def make_folder(tmp_path_factory):
    """root/cat/{00..09}.png|jpg, root/dog/{10..19}, 1 grayscale JPEG, 1 RGBA
    PNG, plus a text file that must be ignored. 20 images."""
    root = tmp_path_factory.mktemp("images")
    for cls, ids in (("cat", range(0, 10)), ("dog", range(10, 20))):
        (root / cls).mkdir()
        for i in ids:
            if i == 3:
                _save(root / cls / f"{i:02d}.jpg", i, mode="L", fmt="JPEG")
            elif i == 14:
                _save(root / cls / f"{i:02d}.png", i, mode="RGBA", fmt="PNG")
            elif i % 2:
                _save(root / cls / f"{i:02d}.JPEG", i, fmt="JPEG")
            else:
                _save(root / cls / f"{i:02d}.png", i, fmt="PNG")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def expected_colour(i, gray=(3,)):
    if i in gray:  # grayscale: PIL's luma of the colour, replicated
        g = round(np.dot(colour(i), (0.299, 0.587, 0.114)))
        return (g, g, g)
    return colour(i)


def ids_of(crops, n=20, gray=(3,)):
    """(..., S, S, 3) solid crops -> (...) file ids, by nearest colour."""
    means = crops.reshape(*crops.shape[:-3], -1, 3).mean(-2)
    table = np.array([expected_colour(i, gray) for i in range(n)], np.float32)
    dist = np.abs(means[..., None, :] - table).sum(-1)
    assert np.all(dist.min(-1) < 6), "a crop matches no file's colour"
    return dist.argmin(-1)


def make_corrupt_folder(tmp_path_factory):
    """8 good images, a truncated JPEG (id 8) and a PNG of garbage (id 9)."""
    root = tmp_path_factory.mktemp("corrupt")
    for i in range(8):
        _save(root / f"{i:02d}.png", i, fmt="PNG")
    _save(root / "08.jpg", 8, fmt="JPEG", size=(64, 64))
    raw = (root / "08.jpg").read_bytes()
    (root / "08.jpg").write_bytes(raw[:len(raw) // 2])
    (root / "09.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return root



def imagenette_or_skip() -> Path:
    if not IMAGENETTE.is_dir():
        pytest.skip(f"imagenette sample not found: {IMAGENETTE} does not exist (see ../shared/data/README.md)")
    return IMAGENETTE
