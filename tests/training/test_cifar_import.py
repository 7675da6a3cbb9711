"""`import-cifar`: tiny files in the official binary layouts become exact PNG class trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.commands.import_cifar import import_cifar
from training.config import CifarImportConfig
from training.exceptions import DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
COARSE = [f"super{i}" for i in range(20)]
FINE = [f"fine{i}" for i in range(100)]


def _image(seed: int) -> np.ndarray:
    """A [32, 32, 3] uint8 image with distinct planes and an asymmetric pattern."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _record(labels: list[int], image: np.ndarray) -> bytes:
    """One official record: the label bytes, then 1024 R, 1024 G, 1024 B, rows in order."""
    return bytes(labels) + image.transpose(2, 0, 1).tobytes()


def _cifar10(root: Path) -> dict[tuple[str, str, int], tuple[str, np.ndarray]]:
    """cifar-10-batches-bin with 2 records per file; -> (split, file stem, record) -> truth."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    truth = {}
    files = [("train", f"data_batch_{i}") for i in range(1, 6)] + [("test", "test_batch")]
    for n, (split, stem) in enumerate(files):
        records = []
        for r in range(2):
            label, image = (3 * n + r) % 10, _image(10 * n + r)
            records.append(_record([label], image))
            truth[(split, stem, r + 1)] = (CIFAR10_NAMES[label], image)
        (folder / f"{stem}.bin").write_bytes(b"".join(records))
    return truth


def _cifar100(root: Path) -> dict[tuple[str, int], tuple[int, int, np.ndarray]]:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
    truth = {}
    for split, labels in (("train", [(0, 5), (19, 99), (7, 42)]), ("test", [(3, 0)])):
        records = []
        for r, (coarse, fine) in enumerate(labels):
            image = _image(100 + 10 * len(truth) + r)
            records.append(_record([coarse, fine], image))
            truth[(split, r + 1)] = (coarse, fine, image)
        (folder / f"{split}.bin").write_bytes(b"".join(records))
    return truth


def _pngs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def test_cifar10_records_become_exact_pngs_in_their_class_folders(tmp_path: Path) -> None:
    truth = _cifar10(tmp_path / "src")
    out = import_cifar(CifarImportConfig(src=tmp_path / "src", out=tmp_path / "out"))
    files = _pngs(out)
    assert len(files) == len(truth) == 12
    for (split, stem, record), (name, image) in truth.items():
        path = out / split / name / f"{stem}_{record:05d}.png"
        assert path in files
        np.testing.assert_array_equal(_pixels(path), image)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CIFAR10_NAMES)


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_uses_the_chosen_label_byte(tmp_path: Path, labels: str) -> None:
    truth = _cifar100(tmp_path / "src")
    src = tmp_path / "src" / "cifar-100-binary"  # the distribution's folder itself works too
    out = import_cifar(CifarImportConfig(src=src, out=tmp_path / "out", labels=labels))
    assert len(_pngs(out)) == 4
    for (split, record), (coarse, fine, image) in truth.items():
        name = FINE[fine] if labels == "fine" else COARSE[coarse]
        path = out / split / name / f"{split}_{record:05d}.png"
        np.testing.assert_array_equal(_pixels(path), image)


def test_a_truncated_file_is_refused_with_its_record_and_no_output(tmp_path: Path) -> None:
    _cifar10(tmp_path / "src")
    broken = tmp_path / "src" / "cifar-10-batches-bin" / "data_batch_4.bin"
    broken.write_bytes(broken.read_bytes()[:-100])  # record 2 of 2 cut short
    with pytest.raises(DataError, match=r"data_batch_4\.bin: truncated .* record 2 is "
                                        "incomplete"):
        import_cifar(CifarImportConfig(src=tmp_path / "src", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging folder left either


def test_a_label_byte_past_the_class_count_is_refused_with_its_record(tmp_path: Path) -> None:
    _cifar100(tmp_path / "src")
    path = tmp_path / "src" / "cifar-100-binary" / "train.bin"
    data = bytearray(path.read_bytes())
    data[2 * (2 + 3072) + 1] = 100  # the fine label of record 3
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train\.bin: record 3: label byte 100 is past the "
                                        r"class count \(100\)"):
        import_cifar(CifarImportConfig(src=tmp_path / "src", out=tmp_path / "out",
                                       labels="coarse"))  # checked whichever byte is kept
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_foreign_folders_and_existing_outputs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pickled = tmp_path / "cifar-10-batches-py"
    pickled.mkdir()
    (pickled / "data_batch_1").write_bytes(b"\x80\x02")
    assert main(["import-cifar", str(pickled), str(tmp_path / "out")]) == 1
    assert "pickled Python version" in caplog.text
    _cifar10(tmp_path / "src")
    (tmp_path / "taken").mkdir()
    assert main(["import-cifar", str(tmp_path / "src"), str(tmp_path / "taken")]) == 1
    assert "already exists" in caplog.text
    assert main(["import-cifar", str(tmp_path / "src"), str(tmp_path / "o"),
                 "--labels", "coarse"]) == 1
    assert "applies to CIFAR-100 only" in caplog.text
    assert main(["import-cifar", str(tmp_path / "src"), str(tmp_path / "o")]) == 0
    assert len(_pngs(tmp_path / "o")) == 12


def _with_names(root: Path, names: list[str]) -> Path:
    """A CIFAR-10 source whose batches.meta.txt holds `names`."""
    _cifar10(root)
    (root / "cifar-10-batches-bin" / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.mark.parametrize(("name", "message"), [
    (".hidden", "would be ignored by fit"),
    ("__MACOSX", "would be ignored by fit"),
    ("x" * 256, "longer than 255 bytes"),
    ("\u00e9" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes of UTF-8
    ("cafe\u0301", "given twice"),  # "café" decomposed, beside "café" composed
])
def test_names_fit_would_drop_or_merge_are_refused_in_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, message: str) -> None:
    names = [*CIFAR10_NAMES[:8], "caf\u00e9", name]
    src = _with_names(tmp_path / "src", names)
    assert main(["import-cifar", str(src), str(tmp_path / "out")]) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage(), caplog.text
    assert "batches.meta.txt" in errors[0].getMessage() and not errors[0].exc_info
    assert "Traceback" not in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_names_are_written_as_fit_reads_them(tmp_path: Path) -> None:
    names = [*CIFAR10_NAMES[:9], "cafe\u0301"]  # decomposed: written composed, as fit reads it
    out = import_cifar(CifarImportConfig(src=_with_names(tmp_path / "src", names),
                                         out=tmp_path / "out"))
    for split in ("train", "test"):
        written = sorted(p.name for p in (out / split).iterdir())
        assert written == sorted([*CIFAR10_NAMES[:9], "caf\u00e9"])


KILLED_IMPORT = """
import os, signal, sys
from pathlib import Path
import training.commands.import_cifar as ci
from training.config import CifarImportConfig

real_write = ci._write_file
def write_then_die(root, *args, **kw):
    real_write(root, *args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or kill -9 would
ci._write_file = write_then_die
ci.import_cifar(CifarImportConfig(src=Path(sys.argv[1]), out=Path(sys.argv[2])))
"""


def test_a_killed_import_leaves_nothing_the_next_import_keeps(tmp_path: Path) -> None:
    import fcntl
    import os
    import subprocess
    import sys

    _cifar10(tmp_path / "src")
    out = tmp_path / "data" / "cifar10"
    killed = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(tmp_path / "src"),
                             str(out)], cwd=Path(__file__).parents[2], capture_output=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    left = [p.name for p in out.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".cifar10") and not out.exists()
    live = out.parent / ".cifar10.importing-live"  # an import writing now: kept
    live.mkdir()
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        import_cifar(CifarImportConfig(src=tmp_path / "src", out=out))
    finally:
        os.close(held)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([".cifar10.importing-live",
                                                                   "cifar10"])
    assert len(_pngs(out)) == 12


def _cifar10_with_a_large_batch(root: Path, records: int, *, bad_last: bool) -> None:
    """_cifar10, its data_batch_1.bin replaced by `records` records (3073 bytes each)."""
    _cifar10(root)
    data = np.zeros((records, 1 + 3072), np.uint8)
    data[:, 0] = np.arange(records) % 10
    data[:, 1:] = np.arange(3072, dtype=np.uint32) % 251
    if bad_last:
        data[-1, 0] = 10
    data.tofile(root / "cifar-10-batches-bin" / "data_batch_1.bin")


def test_a_large_batch_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    _cifar10_with_a_large_batch(tmp_path / "big", 13_000, bad_last=True)  # 40 MB, refused last
    _cifar10_with_a_large_batch(tmp_path / "mid", 2_600, bad_last=False)  # 8 MB, written
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="record 13000: label byte 10"):
            import_cifar(CifarImportConfig(src=tmp_path / "big", out=tmp_path / "out-big"))
        checked = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        import_cifar(CifarImportConfig(src=tmp_path / "mid", out=tmp_path / "out-mid"))
        written = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert checked < 12e6, f"checking a 40 MB file peaked at {checked / 1e6:.1f} MB"
    assert written < 12e6, f"importing an 8 MB file peaked at {written / 1e6:.1f} MB"
    assert len(list((tmp_path / "out-mid" / "train").rglob("*.png"))) == 2_600 + 8
