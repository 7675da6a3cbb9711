"""Cheap refusals before any pixel is decoded: progressive JPEG frames and scans, TIFF tiles."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.decoding import (
    MAX_JPEG_SCANS,
    ImageTooLargeError,
    check_file,
    decode,
    jpeg_scan_count,
)
from tests.imagegen import many_scans_jpeg, progressive_frame_bomb, tiff_tile_bomb
from tests.server_process import ROOT

BUDGET = 40_000_000


def test_a_progressive_jpeg_frame_is_checked_before_drafting() -> None:
    """369 bytes claiming 13000x13000: drafted to 1/8 it would pass the budget, yet libjpeg
    holds the whole frame's coefficients for a progressive file."""
    bomb = progressive_frame_bomb()
    assert len(bomb) < 400
    with pytest.raises(ImageTooLargeError, match="13000x13000"):
        decode(bomb, max_pixels=BUDGET, target_size=256)
    with pytest.raises(ImageTooLargeError, match="13000x13000"):
        decode(bomb, max_pixels=BUDGET, shrink_to_fit=True)


def test_the_frame_bomb_would_have_cost_a_gigabyte(tmp_path) -> None:
    """What the check prevents, measured: Pillow alone on the same bytes (in a child)."""
    path = tmp_path / "bomb.jpg"
    path.write_bytes(progressive_frame_bomb())
    script = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = None\n"
              "img = Image.open(sys.argv[1]); img.draft('RGB', (1625, 1625))\n"
              "try:\n    img.load()\nexcept OSError:\n    pass\n"
              "print(next(line.split()[1] for line in open('/proc/self/status')\n"
              "           if line.startswith('VmHWM:')))")
    peak_kib = int(subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout)
    assert peak_kib > 500_000  # the coefficient buffer, whatever the draft asked


def test_a_jpeg_of_thousands_of_scans_is_refused_unread() -> None:
    bomb = many_scans_jpeg(2000)
    assert jpeg_scan_count(bomb) == 2000
    with pytest.raises(ImageTooLargeError, match="2,000 scans"):
        decode(bomb, max_pixels=BUDGET, target_size=256)


def test_scans_times_pixels_is_bounded() -> None:
    bomb = many_scans_jpeg(60, (6000, 6000))
    with pytest.raises(ImageTooLargeError, match="60 scans"):
        decode(bomb, max_pixels=BUDGET, target_size=256)
    assert decode(many_scans_jpeg(60, (600, 600)), max_pixels=BUDGET).size == (600, 600)


def test_real_progressive_jpegs_and_their_scans_decode() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", progressive=True, exif=Image.Exif())
    data = buf.getvalue()
    assert 5 <= jpeg_scan_count(data) <= MAX_JPEG_SCANS
    assert decode(data, max_pixels=BUDGET).size == (400, 300)


def test_scan_markers_inside_metadata_are_not_counted() -> None:
    """More SOS-looking bytes than the limit inside an APP segment: the walk counts scans."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    payload = b"\xff\xda" * 300
    app15 = b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload
    padded = data[:2] + app15 + data[2:]
    assert jpeg_scan_count(padded) == jpeg_scan_count(data) < MAX_JPEG_SCANS
    assert decode(padded, max_pixels=BUDGET).size == (64, 48)


def test_a_tiff_tile_larger_than_the_budget_is_refused(tmp_path) -> None:
    """8x8 pixels whose one deflate tile claims 32768x32768: libtiff would inflate it all."""
    bomb = tiff_tile_bomb()
    assert Image.open(io.BytesIO(bomb)).size == (8, 8)
    with pytest.raises(ImageTooLargeError, match="tile of 32768x32768"):
        decode(bomb, max_pixels=BUDGET)
    (tmp_path / "tile.tif").write_bytes(bomb)
    with pytest.raises(ImageTooLargeError, match="tile"):
        check_file(tmp_path / "tile.tif", max_pixels=BUDGET)


def test_ordinary_tiled_and_striped_tiffs_decode() -> None:
    import tifffile

    pixels = np.random.default_rng(1).integers(0, 255, (100, 120, 3), np.uint8)
    for layout in ({"tile": (32, 32)}, {"rowsperstrip": 7}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, pixels, compression="zlib", photometric="rgb", **layout)
        assert np.array_equal(np.asarray(decode(buf.getvalue(), max_pixels=BUDGET)), pixels)
