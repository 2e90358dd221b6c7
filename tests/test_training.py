"""The training module: data loaders, the loop, metrics, init, export and the window.

Everything runs on tiny generated data with small inputs; the real data under
../shared/data is used where it exists (the DICOM-vs-export test) and skipped
otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pydicom
import pytest
import SimpleITK
import torch
from PIL import Image
from safetensors.torch import save_file

from models.artifact import ArtifactError, load_artifact
from models.network import build_mobilenet_v2
from models.predictor import SlicePredictor
from models.preprocessing import Preprocessing, input_from_dataset, window
from tests.peers import chest_ct
from training.cli import main
from training.cv import fold_indices
from training.datasets import DataError, Sample, read_image_sample
from training.fit import FitOptions, fit
from training.init import InitError, initialise
from training.layouts import load_all, scan
from training.metrics import classification_metrics
from training.recipe import Recipe

CLASSES = ("benign", "malignant", "normal")
EVALUATE_KEYS = {
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "classes",
    "roc_auc",
}
TINY_RECIPE = Recipe(
    input_size=32, batch_size=8, head_epochs=0, epochs=2, lr=3e-3, patience=5, ema_decay=0.5
)


def slice_image(label: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A synthetic 8-bit 'slice': a dark body with a class-specific bright pattern."""
    image = rng.integers(0, 20, (size, size)).astype(np.uint8)
    if label == "malignant":
        image[size // 4 : size // 2, size // 4 : size // 2] = 230
    elif label == "benign":
        image[:, ::6] = 200
    return image


def make_image_folder(root: Path, per_class: int = 8, with_split: bool = False) -> Path:
    """`root/<class>/*.png`, or `root/<split>/<class>/*.png` with split.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for label in CLASSES:
        for index in range(per_class):
            split = "val" if index % 4 == 0 else "train"
            folder = root / split / label if with_split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{label}-{index}.png"
            Image.fromarray(slice_image(label, rng)).save(folder / name)
            group = f"{label}{index // 2}"
            rows.append({"file": name, "label": label, "group": group, "split": split})
    if with_split:
        with (root / "split.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "label", "group", "split"])
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder made by `pacs-train fit` on generated data (its artifact inside)."""
    root = tmp_path_factory.mktemp("fit")
    data = make_image_folder(root / "data", with_split=True)
    output = root / "run"
    code = main(
        [
            "fit", "--data", str(data), "--output", str(output), "--init", "random",
            "--input-size", "32", "--batch-size", "8", "--epochs", "2", "--head-epochs", "0",
            "--device", "cpu", "--version", "0.0.1", "--plots", str(root / "plots"),
        ]
    )  # fmt: skip
    assert code == 0
    return output


def test_two_epochs_learn_better_than_chance(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=12)
    options = FitOptions(data=data, output=tmp_path / "run", init="random", device="cpu")
    result = fit(options, TINY_RECIPE)
    losses = [row["val_loss"] for row in result.history]
    assert len(losses) == 2
    # Three classes guessed evenly lose ln 3 each. (The mean training loss of two
    # epochs of 4 noisy steps is no measure: with torch 2.14.1, numpy 2.4.6 and
    # Pillow 13.0 it went from 1.102 to 1.106 while the validation loss fell to 0.74.)
    assert min(losses) < 0.9 * math.log(3)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=12)
    recipe = dataclasses.replace(TINY_RECIPE, dropout=0.5)  # dropout draws from torch's RNG

    def run(name: str, **options: Any) -> list[float]:
        result = fit(
            FitOptions(data=data, output=tmp_path / name, init="random", device="cpu", **options),
            recipe,
        )
        return [row["train_loss"] for row in result.history]

    whole = run("whole")
    # A time limit already passed stops the run after its first epoch.
    assert len(run("resumed", max_minutes=1e-9)) == 1
    assert run("resumed", resume=True) == whole


def test_metrics_on_a_hand_checked_case() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.full((6, 3), 0.1)
    probabilities[np.arange(6), predicted] = 0.8
    metrics = classification_metrics(truth, probabilities, CLASSES)
    assert set(metrics) == EVALUATE_KEYS
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # Recalls 1/2, 2/2, 1/2.
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    # Precisions 1/2, 2/3, 1/1 -> F1 1/2, 4/5, 2/3.
    assert metrics["per_class"]["benign"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert metrics["per_class"]["malignant"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["malignant"]["f1"] == pytest.approx(0.8)
    assert metrics["per_class"]["normal"]["f1"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["classes"] == list(CLASSES)
    # Benign scores: positives (0.8, 0.1), negatives (0.1, 0.1, 0.1, 0.8). Of the
    # 8 pairs, 3 are won and 3 tied by the 0.8 positive, 3 tied by the 0.1 one:
    # AUC = (3 + 0.5 * 4) / 8.
    assert metrics["roc_auc"]["benign"] == pytest.approx(5 / 8)


def test_evaluate_writes_the_json_keys(fitted: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "val", per_class=3)
    out = tmp_path / "metrics.json"
    plots = tmp_path / "plots"
    code = main(
        [
            "evaluate", "--model", str(fitted / "artifact"), "--data", str(data),
            "--json", str(out), "--plots", str(plots), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == EVALUATE_KEYS
    assert metrics["n"] == 9
    assert sum(map(sum, metrics["confusion_matrix"])) == 9
    assert {row["support"] for row in metrics["per_class"].values()} == {3}
    assert (plots / "confusion_matrix.png").is_file()
    assert (plots / "roc.png").is_file()


def test_init_path_loads_the_backbone_and_replaces_the_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_mobilenet_v2(num_classes=7)
    state = source.state_dict()
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".pt":
            torch.save(state, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        network, init = initialise(str(path), num_classes=3, dropout=0.2)
        loaded = network.state_dict()
        assert torch.equal(loaded["features.0.0.weight"], state["features.0.0.weight"])
        assert torch.equal(loaded["features.18.1.running_var"], state["features.18.1.running_var"])
        assert loaded["classifier.1.weight"].shape == (3, 1280)
        assert init.pretrained and init.kind == "file"


def test_init_refuses_pickles_and_foreign_weights(tmp_path: Path) -> None:
    pickled = tmp_path / "object.pt"
    torch.save({"weights": io.BytesIO(b"not a tensor")}, pickled)
    with pytest.raises(InitError, match=r"cannot load a state dict"):
        initialise(str(pickled), 3, 0.2)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(InitError, match=r"does not fit MobileNetV2"):
        initialise(str(foreign), 3, 0.2)


def test_imagenet_offline_says_where_to_put_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torchvision.models._api as api

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(InitError) as caught:
        initialise("imagenet", 3, 0.2)
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth") in message
    assert "IMAGENET1K_V2" in message


def test_fit_artifact_is_used_by_the_node(fitted: Path) -> None:
    artifact = load_artifact(fitted / "artifact")
    manifest = artifact.manifest
    assert manifest.name == "lung-ct-mobilenetv2"
    assert manifest.classes == CLASSES
    assert manifest.aggregation.negative_class == "normal"
    assert manifest.preprocessing.input_size == 32
    for key in ("training_data", "recipe", "validation_metrics", "initialisation", "class_codes"):
        assert key in manifest.details
    assert manifest.details["training_data"]["counts"]["train"] == {
        "benign": 6, "malignant": 6, "normal": 6
    }  # fmt: skip
    assert (fitted / "artifact" / "MODEL_CARD.md").read_text().startswith("# Model card")
    predictor = SlicePredictor(artifact.folder, device="cpu")
    probabilities = predictor.predict(np.zeros((4, 3, 32, 32), dtype=np.float32))
    assert probabilities.shape == (4, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (fitted.parent / "plots" / "training_curves.png").is_file()


def test_export_rewrites_the_artifact_from_a_run(fitted: Path, tmp_path: Path) -> None:
    assert main(["export", "--run", str(fitted), "--output", str(tmp_path / "again")]) == 0
    again = load_artifact(tmp_path / "again")
    first = load_artifact(fitted / "artifact")
    assert all(torch.equal(first.state_dict[k], v) for k, v in again.state_dict.items())


def test_corrupted_artifacts_are_refused_by_name(fitted: Path, tmp_path: Path) -> None:
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(fitted / "artifact", changed)
    weights = changed / "weights.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(ArtifactError, match=r"fails its hash check"):
        load_artifact(changed)

    missing = tmp_path / "missing"
    shutil.copytree(fitted / "artifact", missing)
    document = json.loads((missing / "manifest.json").read_text())
    del document["classes"]
    (missing / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"lacks required key.*classes"):
        load_artifact(missing)


@pytest.mark.parametrize(("center", "width"), [(70.0, 30.0), (-600.0, 1200.0)])
def test_dicom_and_its_8bit_export_give_the_same_input(
    tmp_path: Path, center: float, width: float
) -> None:
    """A slice read as DICOM equals the same slice exported as the dataset was.

    The export is what a conforming viewer writes: the DICOM window, 8 bits.
    PNG keeps those 8 bits exactly, so the only difference is rounding to 8
    bits: at most 0.5/255 in [0, 1] before resizing (an average cannot grow
    it), i.e. 0.5/255/std after normalisation. JPEG (quality 95, as the
    dataset's files) adds its own loss at sharp edges: the tolerance is on the
    mean (1/255) and on the 99th percentile (6/255), measured, not a max.
    """
    preprocessing = Preprocessing(window_center=center, window_width=width, input_size=224)
    dataset = pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[15])
    from_dicom = torch.from_numpy(input_from_dataset(dataset, preprocessing))
    from models.preprocessing import hounsfield_units

    grey = np.round(255 * window(hounsfield_units(dataset), center, width)).astype(np.uint8)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    exports: tuple[tuple[str, dict[str, Any]], ...] = ((".png", {}), (".jpg", {"quality": 95}))
    for suffix, options in exports:
        path = tmp_path / f"export{suffix}"
        Image.fromarray(grey).save(path, **options)
        from_export = read_image_sample(Sample(str(path), "normal", "g"), preprocessing)
        difference = ((from_export - from_dicom) * std).abs()  # back in [0, 1] units
        if suffix == ".png":
            assert float(difference.max()) <= 0.5 / 255 + 1e-6
        else:
            assert float(difference.mean()) <= 1 / 255
            assert float(torch.quantile(difference.flatten(), 0.99)) <= 6 / 255


def test_loader_refuses_empty_classes_unreadable_files_and_unknown_labels(
    tmp_path: Path,
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    (data / "extra").mkdir()
    with pytest.raises(DataError, match=r"extra holds no images"):
        scan(data)
    (data / "extra").rmdir()
    with pytest.raises(DataError, match=r"unknown class.*malignant"):
        scan(data, classes=("benign", "normal"))
    (data / "benign" / "broken.png").write_bytes(b"this is not an image")
    folder = scan(data)
    with pytest.raises(DataError, match=r"broken.png"):
        load_all(folder, Preprocessing(0, 100, input_size=32))

    split_data = make_image_folder(tmp_path / "split", per_class=4, with_split=True)
    rows = (split_data / "split.csv").read_text().replace(",normal,", ",healthy,", 1)
    (split_data / "split.csv").write_text(rows)
    with pytest.raises(DataError, match=r"file 'normal-0.png' not found"):
        scan(split_data)


def test_dicom_and_volume_loaders_read_through_the_node_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    preprocessing = Preprocessing(window_center=40, window_width=400, input_size=32)
    dicom_root = tmp_path / "dicom"
    uids = {}
    for label in ("malignant", "normal"):
        uids[label] = pydicom.uid.generate_uid()
        (dicom_root / label).mkdir(parents=True)
        for index in range(2):
            dataset = synthetic_ct(rng, uids[label], index)
            dataset.save_as(dicom_root / label / f"{index}.dcm", enforce_file_format=True)
    labels = dicom_root / "labels.csv"
    labels.write_text("uid,label\n" + "".join(f"{u},{label}\n" for label, u in uids.items()))
    folder = scan(dicom_root)
    assert folder.layout == "dicom"
    slices = load_all(folder, preprocessing)
    assert slices.class_counts() == {"malignant": 2, "normal": 2}
    first = pydicom.dcmread(slices.samples[0].source)
    assert np.array_equal(slices.inputs[0].numpy(), input_from_dataset(first, preprocessing))
    with pytest.raises(DataError, match=r"unknown label.*'normal'"):
        scan(dicom_root, classes=("benign", "malignant"))

    volume_root = tmp_path / "volumes"
    volume_root.mkdir()
    volume = SimpleITK.GetImageFromArray(rng.integers(-1000, 400, (3, 16, 16)).astype(np.int16))
    SimpleITK.WriteImage(volume, str(volume_root / "case.nii.gz"))
    (volume_root / "labels.csv").write_text("file,label\ncase.nii.gz,benign\n")
    volumes = load_all(scan(volume_root), preprocessing)
    assert len(volumes) == 3 and volumes.classes == ("benign",)
    (volume_root / "labels.csv").write_text("file,label\nmissing.nii.gz,benign\n")
    with pytest.raises(DataError, match=r"missing.nii.gz does not exist"):
        scan(volume_root)


def synthetic_ct(rng: np.random.Generator, series: str, index: int) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = series
    dataset.PatientID = series[-6:]
    dataset.Modality = "CT"
    dataset.InstanceNumber = index + 1
    dataset.Rows = dataset.Columns = 24
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.RescaleIntercept = -1024
    dataset.RescaleSlope = 1
    dataset.PixelData = rng.integers(0, 2000, (24, 24)).astype(np.uint16).tobytes()
    return dataset


def test_grouped_folds_keep_groups_together(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, with_split=True)
    slices = load_all(scan(data), Preprocessing(0, 100, input_size=32))
    groups = np.array(slices.groups())
    for train, test in fold_indices(slices, "grouped", 2, seed=0):
        assert not set(groups[train]) & set(groups[test])
    shared = [
        set(groups[train]) & set(groups[test])
        for train, test in fold_indices(slices, "image", 2, seed=0)
    ]
    assert any(shared)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("fit", "evaluate", "cv", "export", "measure-window", "convert-keras"):
        assert command in text


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--model", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_gives_slice_probabilities_and_the_series_rule(
    fitted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "series.json"
    model = str(fitted / "artifact")
    series = str(chest_ct())
    code = main(["predict", "--model", model, "--dicom", series, "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["slices"]) == 30
    assert [row["instance"] for row in result["slices"]] == list(range(1, 31))
    # ceil(0.1 * 30) = 3 evidence slices: those least likely to be normal.
    assert len(result["series"]["evidence"]) == 3
    assert result["series"]["label"] in CLASSES
