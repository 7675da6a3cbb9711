"""Image bytes of every kind a client may send, good and bad, made on the fly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size: tuple[int, int] = (320, 240), color: tuple[int, int, int] = (200, 40, 40),
          seed: int = 0) -> Image.Image:
    """A noisy, mostly `color` RGB image."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-30, 30, (size[1], size[0], 3)),
                  0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def good_images(color: tuple[int, int, int] = (200, 40, 40)) -> dict[str, bytes]:
    """One of every real-world format and mode that must decode to a sensible RGB image."""
    img = photo(color=color)
    sixteen = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    frames = [photo(color=color, seed=1), photo(color=(0, 0, 0), seed=2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgba = img.convert("RGBA")
    rgba.putalpha(200)
    return {
        "baseline.jpg": _save(img, "JPEG", quality=90),
        "progressive.jpg": _save(img, "JPEG", quality=90, progressive=True),
        "cmyk.jpg": _save(img.convert("CMYK"), "JPEG"),
        "rgb.png": _save(img, "PNG"),
        "gray16.png": _save(Image.fromarray(sixteen), "PNG"),
        "gray.png": _save(img.convert("L"), "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "palette.png": _save(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "animated.gif": gif.getvalue(),
        "image.webp": _save(img, "WEBP"),
        "image.bmp": _save(img, "BMP"),
        "image.tiff": _save(img, "TIFF"),
        "tiny.png": _save(photo((1, 1), color=color), "PNG"),
        "wide.jpg": _save(photo((4000, 60), color=color), "JPEG"),
        "rotated.jpg": exif_rotated(color),
    }


def exif_rotated(color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A 200x100 JPEG stored sideways: left half `color`, right half blue; EXIF orientation 6
    (displayed rotated 90 degrees clockwise, so `color` ends up on top, image 100x200)."""
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :100] = color
    arr[:, 100:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr, "RGB"), "JPEG", quality=95, exif=exif)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG that claims width x height 1-bit pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def bad_images() -> dict[str, bytes]:
    """Bytes that are not a decodable image."""
    jpeg = _save(photo(), "JPEG")
    rng = np.random.default_rng(3)
    return {
        "empty.jpg": b"",
        "text.jpg": b"hello, this is not an image\n" * 10,
        "page.png": b"<!doctype html><html><body><img src=x></body></html>",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "random.bin": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "header-only.png": b"\x89PNG\r\n\x1a\n",
    }


def strip_png(width: int, height: int) -> bytes:
    """A PNG of extreme aspect ratio (a few hundred bytes for a 12000x1 strip)."""
    return _save(Image.new("RGB", (width, height), (200, 40, 40)), "PNG", optimize=True)


def ico_embedding(png: bytes, *, listed_size: int = 16) -> bytes:
    """An ICO whose one directory entry says `listed_size` pixels and holds the PNG `png`."""
    entry = struct.pack("<BBBBHHII", listed_size % 256, listed_size % 256, 0, 0, 1, 32,
                        len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def icon(size: int = 32, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real ICO file as Pillow writes it."""
    return _save(Image.new("RGB", (size, size), color), "ICO", sizes=[(size, size)])


def progressive_frame_bomb(width: int = 13_000, height: int = 13_000) -> bytes:
    """A few hundred bytes of progressive JPEG whose frame claims `width` x `height`: libjpeg
    allocates the full-size coefficient buffer before it finds the data missing."""
    data = _save(Image.new("RGB", (16, 16), (200, 40, 40)), "JPEG", progressive=True)
    sof = data.index(b"\xff\xc2")
    patched = data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]
    return patched[:patched.index(b"\xff\xda") + 40]  # the first scan's header and a little


def many_scans_jpeg(scans: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A progressive JPEG of a flat image whose last scan is repeated until it has `scans`
    scans (each one more pass of the decoder over the whole frame; libjpeg warns, goes on)."""
    data = _save(Image.new("RGB", size, (200, 40, 40)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    present = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * max(0, scans - present) + data[end:]


def tiff_tile_bomb(tile: int = 32_768) -> bytes:
    """An 8x8 deflate TIFF whose one tile claims `tile` x `tile` pixels: libtiff inflates the
    whole tile before cropping it to the image."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8, 3), np.uint8), tile=(16, 16), compression="zlib",
                     photometric="rgb")
    data = bytearray(buf.getvalue())
    for tag in (322, 323):  # TileWidth, TileLength: patched in the IFD entry, in place
        entry = _tiff_entry(bytes(data), tag)
        kind = struct.unpack_from("<H", data, entry + 2)[0]
        struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, tile)
    return bytes(data)


def _tiff_entry(data: bytes, tag: int) -> int:
    """The offset of `tag`'s entry in a little-endian TIFF's first IFD."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == tag:
            return entry
    raise ValueError(f"no tag {tag}")


def rgba_png_within_budget(width: int = 6_000, height: int = 6_000) -> bytes:
    """A PNG of a few tens of kB that is within a 40 MP budget, yet decoding it and making
    it RGB (alpha composited over white) takes about 15 bytes per pixel."""
    return _save(Image.new("RGBA", (width, height), (200, 40, 40, 128)), "PNG", optimize=True)


def gray_alpha_png(width: int = 6_300, height: int = 6_300) -> bytes:
    """About 100 kB of gray + alpha PNG within a 40 MP budget whose decode, made RGB over
    white, takes about 13 bytes per pixel (over 500 MB here): nothing in its header says so."""
    return _save(Image.new("LA", (width, height), (128, 100)), "PNG", optimize=True)
