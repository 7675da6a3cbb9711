"""The image formats the project reads, one entry each: serving's uploads, training's files,
the API's description and the decoder's checks all come from `IMAGE_FORMATS`.

A format is read only when the size of the frame that will be decoded is known before any
pixel is; `precheck` says how (models.decoding does it). A new format is one entry here,
with its check in models.decoding when the header alone does not say.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    """One format: Pillow's name for it, its file suffixes, its media type and what is
    checked before decoding."""

    pillow: str
    suffixes: tuple[str, ...]
    media_type: str
    precheck: str
    reduced_scale: bool = False  # libjpeg can decode it at 1/2, 1/4, 1/8 of its size
    opener: str = ""  # the Pillow opener that reads it, when not its own name

    @property
    def opened_by(self) -> str:
        """The name Pillow's `Image.open(formats=...)` knows it by."""
        return self.opener or self.pillow


IMAGE_FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", (".jpg", ".jpeg", ".jpe", ".jfif"), "image/jpeg",
                "frame size; a progressive file at its full frame, its scans counted",
                reduced_scale=True),
    ImageFormat("MPO", (".mpo",), "image/jpeg",
                "as JPEG (the multi-picture files phone cameras write)", reduced_scale=True,
                opener="JPEG"),
    ImageFormat("PNG", (".png",), "image/png", "frame size"),
    ImageFormat("GIF", (".gif",), "image/gif", "the first frame's size"),
    ImageFormat("WEBP", (".webp",), "image/webp", "the canvas size"),
    ImageFormat("BMP", (".bmp", ".dib"), "image/bmp", "frame size"),
    ImageFormat("TIFF", (".tif", ".tiff"), "image/tiff",
                "the first page's size and its tile or strip size"),
    ImageFormat("ICO", (".ico",), "image/x-icon",
                "every embedded PNG or DIB header (the directory's sizes stop at 256)"),
)

PILLOW_FORMATS: tuple[str, ...] = tuple(f.pillow for f in IMAGE_FORMATS)
OPENERS: tuple[str, ...] = tuple(dict.fromkeys(f.opened_by for f in IMAGE_FORMATS))
REDUCED_SCALE_FORMATS: tuple[str, ...] = tuple(f.pillow for f in IMAGE_FORMATS
                                               if f.reduced_scale)
IMAGE_SUFFIXES: frozenset[str] = frozenset(s for f in IMAGE_FORMATS for s in f.suffixes)
MEDIA_TYPES: tuple[str, ...] = tuple(dict.fromkeys(f.media_type for f in IMAGE_FORMATS))


def accepted_text() -> str:
    """The accepted formats as messages and the API description name them."""
    return ", ".join(f.pillow for f in IMAGE_FORMATS)
