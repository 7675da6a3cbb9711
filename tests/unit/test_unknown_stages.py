"""The stage Mahalanobis score (models.unknown_stages): its statistics and whitening against
plain formulas, and on a tiny real digits model whether it flags texture photographs and
accepts unseen digits at the 95% threshold, where the cosine rule it replaces does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.architectures import build
from models.unknown import acceptance_threshold, class_means, cosine_distance
from models.unknown_stages import (
    STANDARDISE_KEY,
    StageDistances,
    StagedNetwork,
    StageMahalanobis,
    StageStatistics,
    fit_state,
    stage_key,
    stage_widths,
    state_problem,
    whitening,
)

SIZE = 16
STEPS = 80


@pytest.mark.parametrize("arch", ["resnet18", "resnet20", "resnet50"])
def test_the_staged_network_answers_the_models_logits_and_each_stages_mean(arch: str) -> None:
    torch.manual_seed(0)
    model = build(arch, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = []
    stages = [m for n, m in model.named_children() if n.startswith("layer")]
    hooks = [s.register_forward_hook(lambda _m, _a, out: captured.append(out.mean((2, 3))))
             for s in stages]
    with torch.no_grad():
        expected = model(x)
        logits, pooled = StagedNetwork(model, "fc")(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(logits, expected)
    assert [p.shape[1] for p in pooled] == stage_widths(model)
    for got, want in zip(pooled, captured[:len(stages)], strict=True):
        torch.testing.assert_close(got, want)


def test_statistics_give_class_means_and_the_whitening_of_the_shrunk_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)) + np.repeat(np.eye(5)[:2] * 3, 20, axis=0)
    y = np.repeat([0, 1], 20)
    stats = StageStatistics(3)
    for chunk in np.array_split(np.arange(40), 3):  # batches sum to the whole
        stats.add([torch.as_tensor(x[chunk])], torch.as_tensor(y[chunk]))
    [(means, white)] = stats.gaussians(shrinkage=0.1)
    expected = np.stack([x[y == 0].mean(0), x[y == 1].mean(0), x.mean(0)])  # class 2: none
    np.testing.assert_allclose(means.numpy(), expected, rtol=1e-5, atol=1e-5)
    residual = x - expected[y]
    cov = residual.T @ residual / len(x)
    shrunk = 0.9 * cov + 0.1 * np.trace(cov) / 5 * np.eye(5)
    np.testing.assert_allclose((white.double().T @ white.double()).numpy(),
                               np.linalg.inv(shrunk), rtol=1e-4, atol=1e-5)
    probe = rng.normal(size=(4, 5))
    distances = StageDistances([(means, white)])([torch.as_tensor(probe)])[:, 0].numpy()
    direct = [min((p - m) @ np.linalg.inv(shrunk) @ (p - m) for m in expected) for p in probe]
    np.testing.assert_allclose(distances, direct, rtol=1e-4)


def test_a_multi_label_image_counts_towards_every_class_it_carries() -> None:
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    stats = StageStatistics(2)
    stats.add([features], torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    [(means, _)] = stats.gaussians()
    torch.testing.assert_close(means, torch.tensor([[2.0, 0.0], [1.5, 1.0]]))


def test_whitening_survives_a_singular_covariance() -> None:
    cov = torch.zeros(4, 4)
    cov[0, 0] = 2.0
    white = whitening(cov, 0.1)
    assert torch.isfinite(white).all()
    assert torch.isfinite(whitening(torch.zeros(3, 3), 0.1)).all()


def _state(widths: list[int], classes: int) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    pooled = [torch.rand(12, w, generator=rng) for w in widths]
    return fit_state([(pooled, torch.arange(12) % classes)], pooled, classes)


def test_validation_scores_are_standardised_per_stage() -> None:
    rng = torch.Generator().manual_seed(1)
    train = [torch.rand(30, 4, generator=rng), torch.rand(30, 6, generator=rng)]
    val = [torch.rand(15, 4, generator=rng), torch.rand(15, 6, generator=rng)]
    state = fit_state([(train, torch.arange(30) % 3)], val, 3)
    distances = StageDistances([(state[stage_key(s, "means")], state[stage_key(s, "whitening")])
                                for s in range(2)])(val)
    z = (distances - state[STANDARDISE_KEY][:, 0]) / state[STANDARDISE_KEY][:, 1]
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(StageMahalanobis(state)(val), z.sum(1))


def test_a_malformed_state_is_named() -> None:
    state = _state([4, 6], 3)
    assert state_problem(state, [4, 6], 3) is None
    cases = {
        "holds no unknown.stage1.whitening": {k: v for k, v in state.items()
                                              if k != stage_key(1, "whitening")},
        r"unknown.stage0.means must be finite floats of shape \[3, 4\]":
            {**state, stage_key(0, "means"): torch.ones(2, 4)},
        r"unknown.stage1.whitening must be finite": {**state, stage_key(1, "whitening"):
                                                     torch.full((6, 6), float("nan"))},
        r"unknown.standardise must be finite floats of shape \[2, 2\]":
            {**state, STANDARDISE_KEY: torch.ones(2, 2, dtype=torch.int64)},
        "positive scales": {**state, STANDARDISE_KEY: torch.tensor([[0.0, 1.0], [0.0, 0.0]])},
        "does not use": {**state, "unknown.stage9.means": torch.ones(1)},
    }
    for message, broken in cases.items():
        problem = state_problem(broken, [4, 6], 3)
        assert problem is not None
        assert __import__("re").search(message, problem), problem


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """A CIFAR ResNet-20 trained a few seconds on real digit scans at 16 px (about 95%
    accurate), its normalised train/val/holdout digits and grey texture photographs."""
    return train_digits(steps=STEPS)


def train_digits(steps: int) -> dict[str, torch.Tensor]:
    """The `digits` fixture, trained for `steps` batches of 32."""
    import skimage.data
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=SIZE, mode="bilinear").expand(-1, 3, -1, -1)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(images)))
    targets = torch.as_tensor(data.target)
    rng = np.random.default_rng(1)
    crops = []
    for k in range(120):
        picture = getattr(skimage.data, ("brick", "grass", "gravel", "camera")[k % 4])()
        side = int(rng.integers(24, 97))
        y, x = (int(rng.integers(0, n - side)) for n in picture.shape)
        crop = torch.as_tensor(picture[y:y + side, x:x + side], dtype=torch.float32) / 255
        crops.append(F.interpolate(crop[None, None], size=SIZE, mode="bilinear")[0])
    textures = torch.stack(crops).expand(-1, 3, -1, -1)
    normal = lambda t: (t - 0.45) / 0.25  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build("resnet20", num_classes=10)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        train = order[:700]
        model.train()
        for step in range(steps):
            batch = train[torch.randint(0, 700, (32,),
                                        generator=torch.Generator().manual_seed(step))]
            loss = F.cross_entropy(model(normal(images[batch])), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return {"model": model, "train": normal(images[train]), "train_y": targets[train],
            "val": normal(images[order[700:1000]]), "holdout": normal(images[order[1000:1400]]),
            "holdout_y": targets[order[1000:1400]], "textures": normal(textures)}


def test_the_stage_rule_flags_texture_photographs_and_accepts_unseen_digits(digits) -> None:
    staged = StagedNetwork(digits["model"], "fc")
    with torch.no_grad():
        (train_logits, train), val, holdout, textures = (
            staged(digits[k]) if k == "train" else staged(digits[k])[1]
            for k in ("train", "val", "holdout", "textures"))
        holdout_logits = staged(digits["holdout"])[0]
        assert float((holdout_logits.argmax(1) == digits["holdout_y"]).float().mean()) > 0.85
        state = fit_state([(train, digits["train_y"])], val, 10)
        score = StageMahalanobis(state)
        cut = acceptance_threshold(score(val).numpy())
        flagged_digits = float((score(holdout) > cut).float().mean())
        flagged_textures = float((score(textures) > cut).float().mean())
    assert flagged_digits <= 0.10
    assert flagged_textures >= 0.80
    # the cosine rule this replaces, on the same model and images, flags fewer of them
    means = class_means(train[-1], digits["train_y"], 10)
    cosine_cut = acceptance_threshold(cosine_distance(val[-1], means).numpy())
    cosine_flagged = float((cosine_distance(textures[-1], means) > cosine_cut).float().mean())
    assert cosine_flagged < flagged_textures
