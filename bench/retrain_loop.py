"""The loop after deployment, measured on real images: a served model, fed back corrected
images of a kind it does badly on through POST /feedback, retrained from itself with
`fit --weights CHECKPOINT_DIR`, and reloaded by the same server.

    nice -n 19 python -m bench.retrain_loop --workdir /tmp/retrain-loop
    python -m bench.retrain_loop --workdir loop --data-only   # the image folders alone

The images are scikit-learn's 1,797 handwritten digit scans (8x8 grey, upscaled to 32 px),
split by a seeded permutation into 800 to train the first model on and 300 held out (the
original holdout), and 400 to send back as feedback and 297 held out, both of the shifted
kind: drawn with thicker strokes (a 5x5 maximum filter, as another pen would). Every command
runs as its own process, the fits and the server on one thread each:

1. `fit train --arch resnet18 --weights none --image-size 32 --epochs 8` into served/digits;
2. `python -m app --checkpoint-dir served --feedback-dir feedback`; both holdouts through
   /predict (accuracy before), the drift figures of /metrics after each;
3. the 400 feedback images POSTed to /feedback with their true labels;
4. train/ and the feedback dataset merged (hard links) into retrain/, then
   `fit retrain --weights served/digits --epochs 6` into served/digits-v2;
5. POST /models/reload; /models lists digits-v2 with its parent; both holdouts through
   /predict?model=digits-v2 (accuracy after).

The result (JSON on stdout) holds both accuracies before and after, the drift figures, the
cards' parent, each step's seconds and the commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageFilter

from bench.common import emit, environment

logger = logging.getLogger("bench.retrain_loop")

SPLITS = (("train", 800, False), ("holdout", 300, False), ("feedback-pool", 400, True),
          ("shifted-holdout", None, True))  # (folder, images (None: the rest), thick strokes)
SIDE = 32
STROKE_FILTER = 5  # the maximum filter that thickens the strokes
REQUEST_IMAGES = 16
FIRST_EPOCHS, RETRAIN_EPOCHS = 8, 6
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_digits(root: Path, seed: int = 0) -> dict[str, Path]:
    """The digit scans as 32 px grey PNGs in class folders, one folder per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target)).tolist()
    folders, start = {}, 0
    for name, count, thick in SPLITS:
        chosen = order[start:] if count is None else order[start:start + count]
        start += len(chosen)
        folders[name] = root / name
        for i in chosen:
            path = root / name / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render(digits.images[i], thick=thick).save(path)
    return folders


def render(scan: np.ndarray, *, thick: bool) -> Image.Image:
    """One 8x8 scan (values 0..16) as a 32 px grey image, its strokes thickened on request."""
    image = Image.fromarray((scan * (255 / 16)).clip(0, 255).astype(np.uint8))
    image = image.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    return image.filter(ImageFilter.MaxFilter(STROKE_FILTER)) if thick else image


def labelled(folder: Path) -> list[tuple[Path, str]]:
    """Every image of a class-folder tree with its class, in a fixed order."""
    return [(path, path.parent.name) for path in sorted(folder.glob("*/*.png"))]


def run_command(argv: Sequence[str], log: Path) -> float:
    """Run one command on one thread at the lowest priority; its seconds."""
    logger.info("$ %s", " ".join(argv))
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["nice", "-n", "19", *argv], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **ONE_THREAD}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({done.returncode}); see {log}")
    return round(time.perf_counter() - started, 1)


def fit_command(data: Path, output: Path, *extra: str) -> list[str]:
    """`python -m training fit` as the bench runs it."""
    return [sys.executable, "-m", "training", "fit", str(data), "--output", str(output),
            "--workers", "0", "--no-progress", *extra]


@contextmanager
def serving(checkpoints: Path, feedback: Path, port: int, log: Path) -> Iterator[httpx.Client]:
    """The real server on one thread, until /ready answers; stopped afterwards."""
    argv = [sys.executable, "-m", "app", "--checkpoint-dir", str(checkpoints), "--feedback-dir",
            str(feedback), "--device", "cpu", "--torch-threads", "1", "--host", "127.0.0.1",
            "--port", str(port)]
    logger.info("$ %s", " ".join(argv))
    with log.open("w") as out:
        proc = subprocess.Popen(["nice", "-n", "19", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            _wait_ready(http, proc, log)
            yield http
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _wait_ready(http: httpx.Client, proc: subprocess.Popen, log: Path) -> None:
    give_up = time.monotonic() + 180
    while time.monotonic() < give_up and proc.poll() is None:
        try:
            if http.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not become ready; see {log}")


def accuracy(http: httpx.Client, model: str, images: list[tuple[Path, str]]) -> float:
    """Share of `images` whose top-1 answer from /predict is their class."""
    right = 0
    for start in range(0, len(images), REQUEST_IMAGES):
        chunk = images[start:start + REQUEST_IMAGES]
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in chunk]
        answer = http.post("/predict", params={"model": model}, files=files)
        answer.raise_for_status()
        results = answer.json()["results"]
        right += sum(r["predictions"][0]["label"] == label
                     for r, (_, label) in zip(results, chunk, strict=True))
    return round(right / len(images), 4)


def drift(http: httpx.Client, model: str) -> dict[str, float]:
    """The model's drift figures (PSI by quantity) as /metrics shows them now."""
    text = http.get("/metrics").text
    pattern = rf'^resnet_serve_drift_psi\{{model="{re.escape(model)}",quantity="(\w+)"\}} (\S+)$'
    return {q: round(float(v), 3) for q, v in re.findall(pattern, text, re.M)}


def send_feedback(http: httpx.Client, model: str, images: list[tuple[Path, str]]) -> int:
    """POST each image with its true label to /feedback; the number stored."""
    stored = 0
    for path, label in images:
        answer = http.post("/feedback", params={"model": model}, data={"label": label},
                           files={"file": (path.name, path.read_bytes(), "image/png")})
        answer.raise_for_status()
        stored += answer.json()["status"] == "created"
    return stored


def merge(folders: Sequence[Path], into: Path) -> Path:
    """Class folders of several trees in one, as hard links (`cp -rl A/. B/. into/`)."""
    for folder in folders:
        shutil.copytree(folder, into, copy_function=os.link, dirs_exist_ok=True)
    return into


def measure(http: httpx.Client, model: str, folders: dict[str, Path]) -> dict[str, Any]:
    """Accuracy on both holdouts, and the drift figures after each."""
    out: dict[str, Any] = {}
    for name in ("holdout", "shifted-holdout"):
        out[name] = accuracy(http, model, labelled(folders[name]))
        out[f"drift_after_{name}"] = drift(http, model)
    return out


def run(workdir: Path, port: int) -> dict[str, Any]:
    """The whole loop in `workdir` (emptied first); the figures."""
    shutil.rmtree(workdir, ignore_errors=True)
    served, feedback, logs = workdir / "served", workdir / "feedback", workdir / "logs"
    logs.mkdir(parents=True)
    folders = write_digits(workdir / "data")
    first = fit_command(folders["train"], served / "digits", "--arch", "resnet18", "--weights",
                        "none", "--image-size", "32", "--epochs", str(FIRST_EPOCHS))
    seconds = {"first_fit": run_command(first, logs / "fit-digits.log")}
    result: dict[str, Any] = {"images": {k: len(labelled(v)) for k, v in folders.items()}}
    with serving(served, feedback, port, logs / "server.log") as http:
        result["before"] = measure(http, "digits", folders)
        started = time.perf_counter()
        result["feedback_stored"] = send_feedback(http, "digits", labelled(
            folders["feedback-pool"]))
        seconds["feedback"] = round(time.perf_counter() - started, 1)
        retrain = merge([folders["train"], feedback / "digits" / "data"], workdir / "retrain")
        second = fit_command(retrain, served / "digits-v2", "--weights", str(served / "digits"),
                             "--epochs", str(RETRAIN_EPOCHS))
        seconds["retrain_fit"] = run_command(second, logs / "fit-digits-v2.log")
        result["reload"] = http.post("/models/reload").json()
        card = http.get("/models/digits-v2").json()["card"]
        result["parent"] = card["parent"]
        result["retrain_recipe"] = card["training"]["recipe"]
        result["after"] = measure(http, "digits-v2", folders)
    result["seconds"] = seconds
    result["commands"] = [" ".join(first), " ".join(second)]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Run the loop and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/retrain-loop"))
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--data-only", action="store_true",
                        help="write the image folders into WORKDIR/data and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if args.data_only:
        folders = write_digits(args.workdir / "data")
        logger.info("%s", ", ".join(f"{p}: {len(labelled(p))} images" for p in folders.values()))
        return
    result = run(args.workdir.resolve(), args.port)
    before, after = result["before"], result["after"]
    result["gain_on_shifted"] = round(after["shifted-holdout"] - before["shifted-holdout"], 4)
    result["change_on_holdout"] = round(after["holdout"] - before["holdout"], 4)
    emit({"environment": environment(), **result})


if __name__ == "__main__":
    main()
