"""Predictor: shapes, top-k, thresholds, and the out-of-memory split."""

from __future__ import annotations

import pytest
import torch

from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.folding import fold_batch_norms
from models.predict import Predictor

PRE = Preprocessing.for_crop(32)


def _predictor(task: str = "single_label", thresholds: list[float] | None = None,
               accelerator: Accelerator | None = None) -> Predictor:
    torch.manual_seed(0)
    classes = ["cat", "dog", "fox", "owl"]
    card = ModelCard(name="t", arch="resnet18", task=task, classes=classes,
                     preprocessing=PRE, thresholds=thresholds)
    model = build("resnet18", num_classes=len(classes))
    return Predictor(model, card, accelerator or Accelerator.create("cpu"))


def _batch(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


def test_single_label_probabilities_sum_to_one_and_top_k_is_sorted() -> None:
    p = _predictor()
    probs = p.probabilities(_batch(5))
    assert probs.shape == (5, 4) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    results = p.postprocess(probs, top_k=3)
    assert len(results) == 5
    for row, result in zip(probs, results, strict=True):
        scores = [x.score for x in result.predictions]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert scores[0] == pytest.approx(float(row.max()))


def test_top_k_is_clamped_to_the_class_count() -> None:
    p = _predictor()
    (result,) = p.postprocess(p.probabilities(_batch(1)), top_k=10**9)
    assert sorted(x.label for x in result.predictions) == ["cat", "dog", "fox", "owl"]


def test_batch_rows_are_independent() -> None:
    p = _predictor()
    batch = _batch(6)
    together = p.probabilities(batch)
    alone = torch.cat([p.probabilities(batch[i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_multi_label_uses_card_thresholds_then_override() -> None:
    p = _predictor("multi_label", thresholds=[0.0, 1.0, 0.0, 1.0])
    probs = p.probabilities(_batch(3))
    for result in p.postprocess(probs, all_scores=True):
        assert {x.label for x in result.predictions} == {"cat", "fox"}
        assert set(result.scores) == {"cat", "dog", "fox", "owl"}
    for row, result in zip(probs, p.postprocess(probs, threshold=0.5), strict=True):
        expected = {c for c, s in zip(p.card.classes, row.tolist(), strict=True) if s >= 0.5}
        assert {x.label for x in result.predictions} == expected


def test_wrong_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a batch"):
        _predictor().probabilities(torch.zeros((2, 3, 64, 64), dtype=torch.uint8))


class _SmallMemoryRuntime(Accelerator):
    """A CPU accelerator that behaves like a GPU that runs out of memory above 2 images."""

    @property
    def is_cuda(self) -> bool:
        return True

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch


def test_out_of_memory_splits_the_batch_and_matches_the_full_result() -> None:
    reference = _predictor().probabilities(_batch(7))
    small = _predictor(accelerator=_SmallMemoryRuntime(device=torch.device("cpu")))
    assert torch.allclose(small.probabilities(_batch(7)), reference, atol=1e-5)



def test_batch_norms_are_folded_without_changing_outputs() -> None:
    torch.manual_seed(1)
    model = build("resnet50", num_classes=4)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        folded = fold_batch_norms(model, x[:1], conv_bn_prefixes=("conv", "bn"))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # untouched
        assert torch.allclose(folded(x), expected, atol=1e-4, rtol=1e-4)


def test_a_batch_norm_not_right_after_its_conv_is_not_folded() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(self.bn1(x))  # the norm comes first: folding would be wrong

    model = Odd()
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.7)
        model.bn1.running_var.fill_(3.0)
    unchanged = fold_batch_norms(model, torch.randn(1, 3, 8, 8), conv_bn_prefixes=("conv", "bn"))
    assert unchanged is model
