"""Smoke tests of the UCI-digits demo (examples/digits): the data composition, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flatmtl_fast

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _load_data_module():
    """examples/digits/data.py, imported from its path (the example is not a package)."""
    spec = importlib.util.spec_from_file_location("digits_demo_data", DEMO / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


data = _load_data_module()


@pytest.fixture(scope="module")
def noisy_split():
    return data.make_datasets(n_train=500, n_test=200, noisy=0.3, noisy_task=1, seed=3)


def test_composition_shapes_and_labels(noisy_split) -> None:
    train, test = noisy_split
    assert train.images.shape == (500, 1, *data.CANVAS) and test.images.shape == (200, 1, *data.CANVAS)
    assert train.images.dtype == torch.float32 and 0 <= train.images.min() and train.images.max() <= 1
    for split in (train, test):
        clean = split.clean_labels
        assert clean.shape == (len(split), 3)
        for k, classes in enumerate(data.NUM_CLASSES):
            assert 0 <= split.labels[:, k].min() and split.labels[:, k].max() < classes
        assert torch.equal(clean[:, 2], clean[:, 0] + clean[:, 1])  # the third task is the sum
    assert torch.equal(test.labels, test.clean_labels)  # the test set is never noisy


def test_no_source_digit_in_both_splits(noisy_split) -> None:
    train, test = noisy_split
    train_sources, test_sources = set(train.sources.flatten().tolist()), set(test.sources.flatten().tolist())
    assert train_sources and test_sources and not train_sources & test_sources


def test_noisy_fraction_is_exact(noisy_split) -> None:
    train, _ = noisy_split
    changed = train.labels != train.clean_labels
    assert changed[:, 1].sum() == round(0.3 * 500)  # exactly the requested fraction of task 1's labels
    assert not changed[:, 0].any() and not changed[:, 2].any()  # and no other task's


def test_low_resource_and_determinism() -> None:
    full, _ = data.make_datasets(n_train=2000, n_test=50, tasks=2)
    low, _ = data.make_datasets(n_train=2000, n_test=50, tasks=2, low_resource=0.1)
    assert full.labels.shape == (2000, 2) and low.labels.shape == (200, 2)
    kept = set(low.sources.flatten().tolist())
    assert len(kept) <= 135 < len(set(full.sources.flatten().tolist()))  # 10 % of the 1,347 training digits
    again, _ = data.make_datasets(n_train=2000, n_test=50, tasks=2, low_resource=0.1)
    assert torch.equal(low.images, again.images) and torch.equal(low.labels, again.labels)


def test_end_to_end_tiny_run(tmp_path: Path) -> None:
    """The command itself, on a tiny subset: a plain aggregator, one with F-MTL and selective updates."""
    methods = ["EW", "UPGrad+F-MTL", "Selective"]
    # The child must import the flatmtl_fast this process tests (also where it is not installed, only on the path).
    package_root = str(Path(flatmtl_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    tiny = ["--epochs", "1", "--n-train", "192", "--n-test", "64", "--batch-size", "32", "--device", "cpu"]
    command = [sys.executable, str(DEMO), "--methods", *methods, "--noisy", "0.2", *tiny, "--out", str(tmp_path)]
    done = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "digits_noisy20-left_1seed.png").stat().st_size > 0
    record = json.loads((tmp_path / "digits_noisy20-left_1seed.json").read_text())
    assert [run["method"] for run in record["runs"]] == methods and list(record["summary"]) == methods
    for run in record["runs"]:
        assert set(run["accuracy"]) == {"left", "right", "sum"}
        assert all(0.0 <= accuracy <= 1.0 for accuracy in run["accuracy"].values())
        assert run["time"]["model_s"] > 0 and run["time"]["aggregation_s"] >= 0
    table = (tmp_path / "digits_noisy20-left_1seed.md").read_text()
    assert all(f"| {method} |" in table for method in methods) and table in done.stdout
