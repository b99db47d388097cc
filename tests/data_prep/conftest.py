"""An image folder with one image of every kind the pre-flight scan must tell apart."""

from __future__ import annotations

import os

import pytest
from PIL import Image


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 24), "red").save(images / "red.png")
    Image.new("RGB", (24, 24), "blue").save(images / "blue.png")
    data = (images / "red.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (24, 24), "green").save(images / "gif.jpg", format="GIF")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (24, 24), "red").save(outside)
    (images / "link_out.png").symlink_to(outside)
    os.mkfifo(images / "fifo.png")
    return images
