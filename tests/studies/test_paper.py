"""The paper study (skip2lora.studies.paper.study): methods, Skip-Cache, HAR loader, timing and report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from skip2lora.cli import run_function
from skip2lora.errors import UserError
from skip2lora.studies.paper.study import (
    DATASET_SHAPES,
    TINY_SHAPES,
    default_settings,
    paper_command,
    run_dataset,
    run_paper_study,
)
from skip2lora.studies.paper.data import HAR_CLASSES, load_domain_shift, read_har_split
from skip2lora.studies.paper.models import (
    METHODS,
    MLP,
    build_tuner,
    lora_all_params,
    matched_lora_ranks,
    skip_params,
)
from skip2lora.studies.paper.document import paper_report_command
from skip2lora.studies.paper.training import PHASES, fine_tune, pretrain

HAR_FEATURES = 561


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning threads stall."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_har_files(root: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A miniature 'UCI HAR Dataset' folder in the real layout and format."""
    rows = rows or {"train": 60, "test": 48}
    rng = np.random.default_rng(seed)
    for split, n in rows.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        labels = np.arange(n) % len(HAR_CLASSES) + 1
        # Class-dependent means so the tiny networks have something to learn.
        x = rng.normal(0.0, 0.3, size=(n, HAR_FEATURES)) + 0.1 * labels[:, None] * np.linspace(-1, 1, HAR_FEATURES)
        np.savetxt(root / split / f"X_{split}.txt", np.clip(x, -1, 1), fmt="%.7e")
        np.savetxt(root / split / f"y_{split}.txt", labels, fmt="%d")
    return root


@pytest.fixture(scope="module")
def har_dir(tmp_path_factory) -> Path:
    return write_har_files(tmp_path_factory.mktemp("har") / "UCI HAR Dataset")


def tiny_pretrained(dataset: str = "digits", seed: int = 0, har_path: Path | None = None):
    data = load_domain_shift(dataset, seed, har_path=har_path, tiny=True)
    settings = default_settings(dataset, tiny=True)
    widths = [data.num_features, *settings.hidden, data.num_classes]
    torch.manual_seed(seed)
    model = MLP(widths)
    pretrain(model, data.source_x, data.source_y, settings.pretrain_epochs, settings.pretrain_batch_size, settings.pretrain_lr, seed)
    return data, settings, model, matched_lora_ranks(widths, settings.rank)


@pytest.mark.parametrize("dataset", ["digits", "fan", "har"])
def test_every_method_trains_on_tiny_data(dataset, har_dir):
    settings = replace(default_settings(dataset, tiny=True), epochs=6)
    result = run_dataset(dataset, settings, seeds=[0], har_path=har_dir if dataset == "har" else None, tiny=True, log=lambda _: None)
    assert set(result["methods"]) == set(METHODS)
    for method in METHODS:
        run = result["runs"][method][0]
        losses = run["fit"]["epoch_losses"]
        assert all(np.isfinite(losses)), method
        assert losses[-1] < losses[0], f"{method} did not lower its training loss: {losses}"
        assert 0.0 <= run["accuracy"] <= 100.0
        assert run["trainable_params"] > 0


def test_skip2_cache_gives_the_same_training_as_no_cache():
    data, settings, model, lora_ranks = tiny_pretrained("digits")
    fits, predictions, tuners = {}, {}, {}
    for method in ("Skip-LoRA", "Skip2-LoRA"):
        torch.manual_seed(7)
        tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
        calls = []
        original = tuner.model.forward_features
        tuner.model.forward_features = lambda x, original=original, calls=calls: (calls.append(len(x)), original(x))[1]
        fits[method] = fine_tune(tuner, data.target_train_x, data.target_train_y, 5, 16, 1e-2, seed=3)
        predictions[method] = tuner.predict(data.target_test_x)
        tuners[method] = (tuner, calls)
    np.testing.assert_allclose(fits["Skip-LoRA"].epoch_losses, fits["Skip2-LoRA"].epoch_losses, rtol=1e-5, atol=1e-7)
    assert torch.equal(predictions["Skip-LoRA"].argmax(1), predictions["Skip2-LoRA"].argmax(1))
    n = len(data.target_train_x)
    uncached_calls, cached_calls = tuners["Skip-LoRA"][1], tuners["Skip2-LoRA"][1]
    assert sum(uncached_calls[:-1]) == 5 * n  # every epoch runs the frozen MLP (last call: predict)
    assert sum(cached_calls[:-1]) == n  # only the first epoch does; then the cache serves every sample
    assert tuners["Skip2-LoRA"][0].cache_complete


def test_har_loader_reads_the_text_format(har_dir, tmp_path):
    x, y = read_har_split(har_dir, "train")
    assert x.shape == (60, HAR_FEATURES) and x.dtype == np.float64
    assert y.min() == 0 and y.max() == len(HAR_CLASSES) - 1
    data = load_domain_shift("har", 0, har_path=har_dir.parent)  # the folder holding 'UCI HAR Dataset' works too
    assert data.num_features == HAR_FEATURES and data.num_classes == 6
    assert len(data.source_x) == 60 and len(data.target_train_x) + len(data.target_test_x) == 48


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "train" / "X_train.txt").write_text("0.1 0.2\n0.3 abc\n"), "line 2"),
        (lambda root: (root / "train" / "X_train.txt").write_text("0.1 0.2\n0.3\n"), "line 2"),
        (lambda root: (root / "train" / "y_train.txt").write_text("1\n" * 59 + "7\n"), "outside 1..6"),
        (lambda root: (root / "test" / "y_test.txt").write_text("1\n2\n"), "must match"),
        (lambda root: (root / "test" / "X_test.txt").unlink(), "missing"),
    ],
)
def test_har_loader_rejects_malformed_files(tmp_path, damage, message):
    root = write_har_files(tmp_path / "UCI HAR Dataset")
    damage(root)
    with pytest.raises(UserError, match=message):
        load_domain_shift("har", 0, har_path=root)


def test_har_needs_an_existing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_domain_shift("har", 0, har_path=tmp_path / "nowhere")
    with pytest.raises(UserError, match="--har_path"):
        load_domain_shift("har", 0, har_path=None)


def test_time_breakdown_sums_to_the_total():
    data, settings, model, lora_ranks = tiny_pretrained("digits")
    for method in METHODS:
        tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
        fit = fine_tune(tuner, data.target_train_x, data.target_train_y, 3, 16, 1e-3, seed=0)
        assert set(fit.phase_s) == set(PHASES)
        assert all(v > 0 for v in fit.phase_s.values()), method
        assert fit.total_s == pytest.approx(sum(fit.phase_s.values()), rel=1e-12)
        assert fit.total_s == pytest.approx(sum(sum(e.values()) for e in fit.epoch_phase_s), rel=1e-12)
        assert fit.wall_s >= fit.total_s  # the parts never exceed the wall clock around them
        assert fit.to_dict()["untimed_s"] == pytest.approx(fit.wall_s - fit.total_s)


@pytest.mark.parametrize("dataset", ["digits", "fan", "har"])
@pytest.mark.parametrize("shapes", [DATASET_SHAPES, TINY_SHAPES], ids=["full", "tiny"])
def test_lora_all_and_skip2_have_equal_trainable_parameters(dataset, shapes):
    features, classes = {"digits": (64, 10), "fan": (256, 3), "har": (HAR_FEATURES, 6)}[dataset]
    shape = shapes[dataset]
    widths = [features, *shape["hidden"], classes]
    ranks = matched_lora_ranks(widths, shape["rank"])
    assert lora_all_params(widths, ranks) == skip_params(widths, [shape["rank"]] * (len(widths) - 1))
    model = MLP(widths)
    counts = {m: build_tuner(m, model, shape["rank"], ranks, 1.0, 4).num_trainable() for m in ("LoRA-All", "Skip2-LoRA", "Skip-LoRA")}
    assert counts["LoRA-All"] == counts["Skip2-LoRA"] == counts["Skip-LoRA"]


def test_impossible_parameter_match_is_a_user_error():
    with pytest.raises(UserError, match="--rank or --hidden"):
        matched_lora_ranks([64, 1024, 1024, 10], 8)


def test_zero_initialised_adapters_reproduce_the_pretrained_model():
    data, settings, model, lora_ranks = tiny_pretrained("digits")
    with torch.no_grad():
        expected = model(data.target_test_x)
    for method in METHODS:
        tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
        torch.testing.assert_close(tuner.predict(data.target_test_x), expected, rtol=1e-5, atol=1e-6, msg=method)


def test_frozen_weights_get_no_gradient_and_stay_put():
    data, settings, model, lora_ranks = tiny_pretrained("digits")
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    for method in METHODS:
        tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
        trainable = {id(p) for p in tuner.trainable_parameters()}
        frozen = [(n, p) for n, p in tuner.model.named_parameters() if id(p) not in trainable]
        before = {n: p.detach().clone() for n, p in frozen}
        # One batch by hand, so the gradients are still there to inspect.
        tuner.train()
        order = torch.arange(len(data.target_train_x))
        tuner.start_epoch(data.target_train_x, order)
        loss = torch.nn.functional.cross_entropy(tuner.forward(tuner.batch_inputs(0, 16)), data.target_train_y[:16])
        tuner.after_forward()
        loss.backward()
        for name, param in frozen:
            assert param.grad is None, f"{method}: frozen {name} received a gradient"
        assert all(p.grad is not None for p in tuner.trainable_parameters()), method
        fine_tune(tuner, data.target_train_x, data.target_train_y, 2, 16, 1e-2, seed=0)
        for name, param in frozen:
            assert torch.equal(param.detach(), before[name]), f"{method}: frozen {name} changed"
        if method == "FT-Last":
            assert len(frozen) == 2 * (len(model.layers) - 1)
        if method in ("Skip-LoRA", "Skip2-LoRA", "LoRA-All"):
            assert len(frozen) == 2 * len(model.layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, pretrained[key]), f"the shared pretrained model changed: {key}"


def test_study_writes_json_and_the_report_renders(tmp_path):
    torch.set_num_threads(2)
    results = run_paper_study("digits", seeds=2, threads=1, out_dir=tmp_path / "out", tiny=True, log=lambda _: None)
    assert torch.get_num_threads() == 2  # the edge-board thread budget is lifted afterwards
    path = tmp_path / "out" / "paper_digits.json"
    saved = json.loads(path.read_text())
    assert saved["environment"]["threads"] == 1 and saved["environment"]["torch"] == torch.__version__
    skip2 = saved["methods"]["Skip2-LoRA"]
    assert len(skip2["accuracy"]["values"]) == 2
    assert skip2["total_s"]["mean"] == pytest.approx(sum(v["mean"] for v in skip2["phase_s"].values()))
    assert "reduction_vs_lora_all_pct" in skip2 and results["digits"]["dataset"]["name"] == "digits"

    out_md = tmp_path / "docs" / "paper.md"
    assert paper_report_command([str(path)], out=out_md) == 0
    text = out_md.read_text()
    assert "| Skip2-LoRA |" in text and "| LoRA-All |" in text
    assert f"{skip2['accuracy']['mean']:.1f} ± {skip2['accuracy']['std']:.1f}" in text
    assert (tmp_path / "docs" / "paper_time.png").stat().st_size > 0
    assert (tmp_path / "docs" / "paper_accuracy.png").stat().st_size > 0


def test_command_line_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="--seeds"):
        run_function("paper", paper_command, ["--dataset", "digits", "--seeds", "0", "--tiny", "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--har_path"):
        run_function("paper", paper_command, ["--dataset", "har", "--seeds", "1", "--tiny", "--out_dir", str(tmp_path)])
