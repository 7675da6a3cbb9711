"""Decode + resize + crop of web-size JPEGs on one core: the service's Pillow path (draft
scaling in libjpeg, `models.preprocessing.EvalCrop`, what the decode processes run) against
simplejpeg (libjpeg-turbo's DCT scaling in one C call), and how far their crops differ.

    python -m bench.jpeg_decoders [--seconds 2] [--rounds 3]

simplejpeg decodes at the scale Pillow's draft picks (the header's size divided by
`models.decoding.reduced_scale`), then the same resize and centre crop; the crops are
compared pixel by pixel. Rates are images per CPU-second of this process (one thread), the
two alternated round by round. Bench only: simplejpeg is not a dependency of the service.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench.common import IMAGENET_PRE, emit, web_jpegs
from models.decoding import DEFAULT_MAX_PIXELS, reduced_scale
from models.preprocessing import EvalCrop, ResizeCenterCrop


def simplejpeg_crop(pre_resize: int, crop: ResizeCenterCrop) -> Callable[[bytes], np.ndarray]:
    """bytes -> uint8 HWC crop through simplejpeg at Pillow's draft scale."""
    import simplejpeg

    def run(data: bytes) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = reduced_scale(width, height, pre_resize)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                        min_width=-(-width // scale))
        return np.asarray(crop(Image.fromarray(pixels)))

    return run


def per_cpu_second(run: Callable[[bytes], object], jpegs: list[bytes], seconds: float) -> float:
    """Images per CPU-second of this thread over about `seconds` of its CPU."""
    done, began = 0, time.thread_time()
    while time.thread_time() - began < seconds:
        for data in jpegs:
            run(data)
        done += len(jpegs)
    return done / (time.thread_time() - began)


def main(argv: list[str] | None = None) -> dict:
    """Compare the crops, then alternate the two rates; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    pre = IMAGENET_PRE["resnet50"]
    jpegs = web_jpegs()
    pillow = EvalCrop(pre)

    def with_pillow(data: bytes) -> np.ndarray:
        return pillow(data, DEFAULT_MAX_PIXELS)

    try:
        other = simplejpeg_crop(pre.resize, ResizeCenterCrop(pre.resize, pre.crop,
                                                             pre.interpolation))
    except ImportError:
        emit({"simplejpeg": "not installed (pip install simplejpeg)"})
        return {}
    diffs = [np.abs(with_pillow(d).astype(np.int16) - other(d).astype(np.int16))
             for d in jpegs]
    rounds = [{"pillow": round(per_cpu_second(with_pillow, jpegs, args.seconds), 1),
               "simplejpeg": round(per_cpu_second(other, jpegs, args.seconds), 1)}
              for _ in range(args.rounds)]
    out = {"photos": len(jpegs), "resize": pre.resize, "crop": pre.crop,
           "crop_difference": {"mean": float(np.mean([d.mean() for d in diffs])),
                               "worst_mean": float(max(d.mean() for d in diffs)),
                               "max": int(max(d.max() for d in diffs))},
           "images_per_cpu_second": rounds,
           "ratio": [round(r["simplejpeg"] / r["pillow"], 3) for r in rounds]}
    emit(out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
