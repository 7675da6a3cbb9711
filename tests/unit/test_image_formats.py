"""The formats read are one table (models.image_formats): the decoder, training's discovery,
the upload body's OpenAPI description and the OIP metadata all follow it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from app.api.transport import UPLOAD_BODY
from models.decoding import ImageDecodeError, decode
from models.image_formats import IMAGE_FORMATS, IMAGE_SUFFIXES, MEDIA_TYPES, accepted_text
from training.data.discovery import discover

WRITABLE = [f for f in IMAGE_FORMATS if f.pillow != "MPO"]  # Pillow writes MPO from frames


def _encoded(pillow: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 40, 40)).save(buf, pillow)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", WRITABLE, ids=lambda f: f.pillow)
def test_every_format_of_the_table_decodes(fmt) -> None:
    assert decode(_encoded(fmt.pillow)).size[0] in (16, 24)


@pytest.mark.parametrize("pillow", ["ICNS", "PPM", "TGA", "PCX", "SGI"])
def test_formats_outside_the_table_are_refused_naming_the_table(pillow: str) -> None:
    with pytest.raises(ImageDecodeError, match=f"accepted: {accepted_text()}"):
        decode(_encoded(pillow))


def test_training_finds_exactly_the_tables_suffixes(tmp_path: Path) -> None:
    for klass in ("a", "b"):
        for fmt in WRITABLE:
            for suffix in fmt.suffixes:
                path = tmp_path / klass / f"img{suffix}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(_encoded(fmt.pillow))
        (tmp_path / klass / "img.ppm").write_bytes(_encoded("PPM"))
    found = discover(tmp_path)
    suffixes = {sample.path.suffix for sample in found.samples}
    assert suffixes == {s for f in WRITABLE for s in f.suffixes} and suffixes <= IMAGE_SUFFIXES


def test_the_upload_body_lists_every_media_type() -> None:
    described = set(UPLOAD_BODY["requestBody"]["content"]) - {"multipart/form-data"}
    assert described == set(MEDIA_TYPES)


def _mpo() -> bytes:
    buf = io.BytesIO()
    first, second = Image.new("RGB", (24, 16), (200, 40, 40)), Image.new("RGB", (24, 16))
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def test_feedback_stores_each_format_under_the_tables_first_suffix() -> None:
    from app.serving.feedback_store import suffix_of

    for fmt in IMAGE_FORMATS:
        data = _mpo() if fmt.pillow == "MPO" else _encoded(fmt.pillow)
        assert suffix_of(data) == fmt.suffixes[0], fmt.pillow
    assert suffix_of(_encoded("PPM")) is None and suffix_of(b"RIFF\0\0\0\0WEBPnot") is None
