"""The feedback store: the layout `fit` reads, one file per image content, relabelling,
labels checked, a quota that leaves nothing behind, and a disk that refuses a write (a real
file size limit) leaving every file as it was."""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
from pathlib import Path

import pytest

from app.exceptions import InvalidRequestError, StorageFullError
from app.serving.feedback_store import FeedbackStore, checked_labels
from tests.serving_helpers import CLASSES, jpeg, png
from training.data.discovery import discover

MB = 1 << 20


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_single_label_images_land_in_class_folders_fit_reads(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, quota_bytes=MB, review_quota_bytes=MB)
    red, green = jpeg("red", seed=1), png("green", seed=2)
    first = store.save("colors", "single_label", red, ["red"])
    assert first.status == "created" and first.image.startswith("red/")
    assert store.save("colors", "single_label", red, ["red"]).status == "unchanged"
    store.save("colors", "single_label", green, ["green"])
    moved = store.save("colors", "single_label", red, ["blue"])  # the latest label counts
    assert moved.status == "relabelled" and moved.image.startswith("blue/")
    data = tmp_path / "colors" / "data"
    assert sorted(str(p.relative_to(data)).split("/")[0] for p in data.rglob("*.*")) == \
        ["blue", "green"]
    found = discover(data, task="single")
    assert sorted(s.labels[0] for s in found.samples) == ["blue", "green"]
    assert not list((tmp_path / "colors" / ".tmp").iterdir())


def test_multi_label_rows_are_appended_and_rewritten_for_new_labels(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, quota_bytes=MB, review_quota_bytes=MB)
    a, b = jpeg("red", seed=3), jpeg("blue", seed=4)
    assert store.save("tags", "multi_label", a, ["red", "green"]).status == "created"
    assert store.save("tags", "multi_label", a, ["green", "red"]).status == "unchanged"
    store.save("tags", "multi_label", b, ["blue"])
    assert store.save("tags", "multi_label", a, ["red"]).status == "relabelled"
    table = tmp_path / "tags" / "data" / "labels.csv"
    assert table.read_text().splitlines()[0] == "image,labels"
    found = discover(table, task="multi")
    assert sorted(sorted(s.labels) for s in found.samples) == [["blue"], ["red"]]
    assert len(list((tmp_path / "tags" / "data" / "images").iterdir())) == 2


def test_labels_are_checked_against_the_model(tmp_path: Path) -> None:
    ok = checked_labels([" red "], classes=CLASSES, task="single_label", new_classes=False)
    assert ok == ["red"]
    for labels, task, new, message in (
            ([], "single_label", False, "field 'label'"),
            (["red", "blue"], "single_label", False, "one label"),
            (["purple"], "single_label", False, "unknown label 'purple'"),
            (["a/b"], "single_label", True, "slash"),
            ([".hidden"], "single_label", True, "passes over"),
            (["dark red"], "multi_label", True, "spaces")):
        with pytest.raises(InvalidRequestError, match=message):
            checked_labels(labels, classes=CLASSES, task=task, new_classes=new)
    assert checked_labels(["purple"], classes=CLASSES, task="single_label",
                          new_classes=True) == ["purple"]


def test_a_write_past_the_quota_leaves_nothing(tmp_path: Path) -> None:
    image = jpeg("red", seed=5, size=(64, 64))
    store = FeedbackStore(tmp_path, quota_bytes=len(image) + 100, review_quota_bytes=MB)
    store.save("colors", "single_label", image, ["red"])
    before = _files(tmp_path)
    with pytest.raises(StorageFullError, match="quota"):
        store.save("colors", "single_label", jpeg("green", seed=6, size=(64, 64)), ["green"])
    assert _files(tmp_path) == before


def _save_under_file_size_limit(root: str, limit: int, image: bytes, labels: list[str],
                                answer: multiprocessing.Queue) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail: EFBIG
    try:
        FeedbackStore(Path(root), quota_bytes=MB, review_quota_bytes=MB).save(
            "tags", "multi_label", image, labels)
        answer.put("saved")
    except StorageFullError as exc:
        answer.put(f"full: {exc}")


@pytest.mark.parametrize("where", ["image", "row"])
def test_a_disk_refusing_the_write_corrupts_nothing(tmp_path: Path, where: str) -> None:
    store = FeedbackStore(tmp_path, quota_bytes=MB, review_quota_bytes=MB)
    for seed in range(40):  # a labels.csv larger than one image
        store.save("tags", "multi_label", jpeg("red", seed=100 + seed, size=(8, 8)), ["red"])
    table = tmp_path / "tags" / "data" / "labels.csv"
    image = jpeg("blue", seed=7, size=(48, 48))
    assert len(image) < table.stat().st_size
    # "image": no file may grow past a tenth of the image; "row": the image fits, and the
    # row appended to the CSV stops a few bytes in (a short write, then EFBIG)
    limit = len(image) // 10 if where == "image" else table.stat().st_size + 5
    before = _files(tmp_path)
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    child = context.Process(target=_save_under_file_size_limit,
                            args=(str(tmp_path), limit, image, ["blue"], answer))
    child.start()
    child.join(30)
    result = answer.get(timeout=5)
    assert result.startswith("full: the feedback disk refused the write"), result
    assert _files(tmp_path) == before
    assert not list((tmp_path / "tags" / ".tmp").iterdir())
    # and the store goes on where it stood
    assert store.save("tags", "multi_label", image, ["blue"]).status == "created"
    assert len(discover(table, task="multi").samples) == 41


def test_a_torn_row_left_by_a_crash_is_cut_before_the_next_one(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, quota_bytes=MB, review_quota_bytes=MB)
    store.save("tags", "multi_label", jpeg("red", seed=8), ["red"])
    table = tmp_path / "tags" / "data" / "labels.csv"
    whole = table.read_bytes()
    with open(table, "ab") as f:
        f.write(b"images/dead")  # a row a crash cut short
    store.save("tags", "multi_label", jpeg("green", seed=9), ["green"])
    assert table.read_bytes().startswith(whole)
    assert len(table.read_text().splitlines()) == 3
    assert sorted(s.labels for s in discover(table, task="multi").samples) == \
        [("green",), ("red",)]


def test_concurrent_writers_each_get_their_row(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, quota_bytes=MB, review_quota_bytes=MB)
    images = [jpeg(CLASSES[i % 3], seed=200 + i) for i in range(8)]
    threads = [threading.Thread(target=store.save,
                                args=("tags", "multi_label", image, [CLASSES[i % 3]]))
               for i, image in enumerate(images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    table = tmp_path / "tags" / "data" / "labels.csv"
    assert len(discover(table, task="multi").samples) == 8
    assert os.path.getsize(table) == len(table.read_bytes())


def test_least_sure_is_the_top_score_or_the_least_sure_label() -> None:
    import torch

    from app.serving.feedback import confidences

    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert confidences(probabilities, "single_label").tolist() == pytest.approx([0.7, 0.4])
    tags = torch.tensor([[0.9, 0.05, 0.55], [0.99, 0.01, 0.8]])
    assert confidences(tags, "multi_label").tolist() == pytest.approx([0.55, 0.8])
