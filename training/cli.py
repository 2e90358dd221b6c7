"""`pacs-train`: fit, evaluate, cross-validate and export the node's models."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from models.artifact import ArtifactError
from models.preprocessing import Preprocessing
from training.card import render_card
from training.checkpoints import load_checkpoint
from training.cv import PROTOCOLS, CvResult, cross_validate, markdown_table
from training.datasets import DataError
from training.evaluate import BUNDLED_MODEL, evaluate_artifact, predict_series
from training.export import ARTIFACT_NAME, IQ_OTHNCCD_CITATION, export_artifact
from training.fit import FitOptions, FitResult, fit
from training.init import InitError
from training.layouts import LAYOUTS, load_all, scan
from training.metrics import format_report
from training.plots import plot_history
from training.recipe import Recipe
from training.window import MEASURED_CENTER, MEASURED_WIDTH, report

RUN_FILE = "run.json"
RECIPE_HELP = {
    "input_size": "model input side in pixels",
    "batch_size": "slices per batch",
    "head_epochs": "phase 1 epochs: head only, features frozen (skipped with --init random)",
    "head_lr": "phase 1 peak learning rate",
    "train_blocks": "phase 2 trains only the last N of the 19 feature blocks (0: all)",
    "epochs": "phase 2 epochs: the whole network (or its last --train-blocks)",
    "lr": "phase 2 peak learning rate",
    "optimizer": "adamw or sgd",
    "weight_decay": "decoupled (AdamW) or L2 (SGD) weight decay",
    "momentum": "SGD momentum (Nesterov)",
    "warmup_fraction": "share of each phase spent warming the learning rate up",
    "label_smoothing": "cross-entropy label smoothing",
    "balance": "class balance: loss (weighted loss), sampler (balanced batches) or none",
    "ema_decay": "decay of the weight moving average that is evaluated and exported",
    "dropout": "dropout before the new head",
    "rotate_degrees": "augmentation: maximum rotation",
    "scale_range": "augmentation: maximum relative zoom",
    "translate": "augmentation: maximum shift (fraction of the image)",
    "flip": "augmentation: random left-right flip",
    "intensity": "augmentation: maximum relative contrast change",
    "threshold_jitter": "augmentation: maximum raise of the black level (narrower window)",
    "patience": "early stopping: phase 2 epochs without a better validation macro-F1",
    "seed": "random seed (data split, augmentation, initialisation)",
}
EPILOG = """examples:
  pacs-train fit --data ../shared/data/iq-othnccd --init imagenet --output runs/fit
  pacs-train evaluate --data ../shared/data/iq-othnccd/val --json val.json --plots plots/
  pacs-train cv --data ../shared/data/iq-othnccd --protocol image --protocol grouped
  pacs-train measure-window --images ../shared/data/iq-othnccd/train \\
      --dicom ../shared/data/chest-ct-30
"""


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: Recipe) -> None:
    group = parser.add_argument_group("recipe (defaults: the bundled model's recipe)")
    hints = typing.get_type_hints(Recipe)
    for item in fields(Recipe):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        text = f"{RECIPE_HELP[item.name]} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif typing.get_origin(hints[item.name]) is typing.Literal:
            choices = typing.get_args(hints[item.name])
            group.add_argument(flag, choices=choices, default=default, help=text)
        else:
            group.add_argument(flag, type=type(default), default=default, help=text)


def recipe_from(arguments: argparse.Namespace) -> Recipe:
    return Recipe(**{item.name: getattr(arguments, item.name) for item in fields(Recipe)})


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="data folder: class sub-folders of 8-bit images (optionally with split.csv), "
        "DICOM files with labels.csv (uid,label) or volumes with labels.csv (file,label)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="how to read --data (default: auto, from labels.csv)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto uses CUDA when present (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-train",
        description="Train, evaluate and export the lung CT classifier that pacs-node runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = Recipe()

    fit_parser = commands.add_parser(
        "fit",
        help="train (two phases), select on validation, export an artifact",
        description="Train a MobileNetV2 on --data, pick the epoch with the best validation "
        "macro-F1 and export it as a model artifact with a model card.",
    )
    add_data_arguments(fit_parser)
    fit_parser.add_argument(
        "--output",
        type=Path,
        default=Path("runs/fit"),
        help="run folder: checkpoint, history, artifact (default: runs/fit)",
    )
    fit_parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="where to export the artifact (default: OUTPUT/artifact)",
    )
    fit_parser.add_argument(
        "--init",
        default="imagenet",
        help="imagenet (torchvision IMAGENET1K_V2 via its cache), random, or PATH to a "
        "local state dict (.safetensors or a weights-only .pt) (default: imagenet)",
    )
    fit_parser.add_argument(
        "--window-center",
        type=float,
        default=MEASURED_CENTER,
        help=f"HU window centre for DICOM input (default: {MEASURED_CENTER:g})",
    )
    fit_parser.add_argument(
        "--window-width",
        type=float,
        default=MEASURED_WIDTH,
        help=f"HU window width for DICOM input (default: {MEASURED_WIDTH:g})",
    )
    fit_parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="validation share when no split.csv fixes it (default: 0.2)",
    )
    fit_parser.add_argument(
        "--deterministic",
        action="store_true",
        help="use only deterministic kernels (slower on CUDA)",
    )
    fit_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/checkpoint.pt with the same recipe",
    )
    fit_parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the epoch that passes this time and export the best",
    )
    fit_parser.add_argument(
        "--name", default=ARTIFACT_NAME, help=f"artifact name (default: {ARTIFACT_NAME})"
    )
    fit_parser.add_argument("--version", default="1.0.0", help="artifact version (semver)")
    fit_parser.add_argument(
        "--init-note",
        default=None,
        help="provenance of --init PATH, written into the manifest and the model card",
    )
    fit_parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="write training curves, confusion matrix and ROC PNGs here",
    )
    add_recipe_arguments(fit_parser, defaults)

    evaluate_parser = commands.add_parser(
        "evaluate",
        help="score an artifact on a labelled folder",
        description="Run an artifact through the node's predictor on --data and print "
        "n, accuracy, balanced accuracy, macro-F1, per-class scores, the confusion "
        "matrix and one-vs-rest ROC AUC.",
    )
    add_data_arguments(evaluate_parser)
    evaluate_parser.add_argument(
        "--model",
        type=Path,
        default=BUNDLED_MODEL,
        help="artifact folder (default: the bundled model)",
    )
    evaluate_parser.add_argument(
        "--split", default=None, help="only this split of a folder with split.csv"
    )
    evaluate_parser.add_argument("--json", type=Path, default=None, help="write metrics JSON")
    evaluate_parser.add_argument(
        "--plots", type=Path, default=None, help="write confusion matrix and ROC PNGs here"
    )

    cv_parser = commands.add_parser(
        "cv",
        help="k-fold cross-validation, image-level and/or grouped",
        description="Cross-validate the recipe on every image of --data (all splits). "
        "`image` is the paper's protocol (random slices); `grouped` keeps groups together.",
    )
    add_data_arguments(cv_parser)
    cv_parser.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        help="image or grouped; repeat for both (default: both)",
    )
    cv_parser.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    cv_parser.add_argument("--init", default="imagenet", help="as for fit (default: imagenet)")
    cv_parser.add_argument("--json", type=Path, default=None, help="write per-fold metrics JSON")
    add_recipe_arguments(cv_parser, defaults)

    export_parser = commands.add_parser(
        "export",
        help="export the best weights of a fit run folder as an artifact",
        description="Write an artifact from a run folder (checkpoint.pt + run.json), for "
        "example after a fit was interrupted.",
    )
    export_parser.add_argument("--run", type=Path, required=True, help="fit --output folder")
    export_parser.add_argument("--output", type=Path, required=True, help="artifact folder")
    export_parser.add_argument("--name", default=ARTIFACT_NAME, help="artifact name")
    export_parser.add_argument("--version", default="1.0.0", help="artifact version (semver)")
    export_parser.add_argument(
        "--init-note", default=None, help="replace the recorded provenance of the initial weights"
    )

    predict_parser = commands.add_parser(
        "predict",
        help="per-slice probabilities and the series result for a DICOM series",
        description="Run an artifact on one DICOM series exactly as the node does "
        "(preprocessing, predictor, series rule) and print every slice's probabilities.",
    )
    predict_parser.add_argument("--dicom", type=Path, required=True, help="one series folder")
    predict_parser.add_argument(
        "--model",
        type=Path,
        default=BUNDLED_MODEL,
        help="artifact folder (default: the bundled model)",
    )
    predict_parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto uses CUDA when present (default: auto)",
    )
    predict_parser.add_argument("--json", type=Path, default=None, help="write the result JSON")

    window_parser = commands.add_parser(
        "measure-window",
        help="measure the HU window that matches 8-bit exports",
        description="Rank HU windows by how closely windowed DICOM slices match the grey "
        "levels of the training images (1-Wasserstein distance of histograms).",
    )
    window_parser.add_argument(
        "--images", type=Path, required=True, help="folder of the training images"
    )
    window_parser.add_argument("--dicom", type=Path, required=True, help="folder of CT .dcm files")

    convert_parser = commands.add_parser(
        "convert-keras",
        help="convert a Keras MobileNetV2 .h5 into an --init state dict",
        description="Convert a width-1.0 Keras MobileNetV2 (HDF5) into a torchvision "
        "state dict (.safetensors) usable as --init PATH. Needs h5py.",
    )
    convert_parser.add_argument("source", type=Path, help="Keras .h5 file")
    convert_parser.add_argument("target", type=Path, help="output .safetensors file")
    return parser


def run_details(result: FitResult, recipe: Recipe, arguments: argparse.Namespace) -> dict[str, Any]:
    """The manifest's non-required keys for a finished fit."""
    return {
        "training_data": {
            "description": f"{arguments.data.name}: train and val splits of {arguments.data}",
            "citation": IQ_OTHNCCD_CITATION if "iq-oth" in str(arguments.data).lower() else "",
            "counts": result.data_summary,
        },
        "recipe": recipe.to_dict(),
        "initialisation": {
            **result.initialisation.to_dict(),
            "description": arguments.init_note
            or describe_init(result.initialisation.kind, result.initialisation.source),
        },
        "validation_metrics": result.val_metrics,
        "window": {"method": WINDOW_METHOD},
        "fit": {
            "minutes": result.seconds / 60,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "device": "CUDA" if torch.cuda.is_available() and arguments.device != "cpu" else "CPU",
        },
    }


WINDOW_METHOD = (
    "`pacs-train measure-window` windows real chest CT (chest-ct-30) with every "
    "candidate (centre, width) on a 10 HU grid, rounds to 8 bits, and ranks the "
    "windows by the 1-Wasserstein distance between that grey-level histogram and "
    "the histogram of the training images; the best window is used. The training "
    "exports are black below about +60 HU and spread over grey levels 124-255 "
    "above it (no pixel in 12-117), which no linear window reproduces exactly; "
    "the narrow window at the soft-tissue threshold matches them best. See "
    "training/README.md for the table."
)


def describe_init(kind: str, source: str) -> str:
    if kind == "imagenet":
        return f"ImageNet-1K: {source}."
    if kind == "random":
        return "Random (torchvision's default initialisation); no pretrained features."
    return (
        f"Local state dict `{source}` (backbone only; new head). See training/README.md "
        "for its provenance."
    )


def command_fit(arguments: argparse.Namespace) -> int:
    recipe = recipe_from(arguments)
    options = FitOptions(
        data=arguments.data,
        output=arguments.output,
        init=arguments.init,
        layout=arguments.layout,
        window_center=arguments.window_center,
        window_width=arguments.window_width,
        val_fraction=arguments.val_fraction,
        device=arguments.device,
        deterministic=arguments.deterministic,
        resume=arguments.resume,
        max_minutes=arguments.max_minutes,
    )
    result = fit(options, recipe)
    details = run_details(result, recipe, arguments)
    run = {
        "classes": list(result.classes),
        "preprocessing": result.preprocessing.to_dict(),
        "details": details,
    }
    (arguments.output / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    folder = arguments.artifact or arguments.output / "artifact"
    write_artifact(
        folder,
        result.network,
        result.classes,
        result.preprocessing,
        details,
        arguments.name,
        arguments.version,
    )
    print(format_report(result.val_metrics))
    if arguments.plots is not None:
        from training.plots import plot_confusion

        arguments.plots.mkdir(parents=True, exist_ok=True)
        plot_history(result.history, arguments.plots / "training_curves.png")
        plot_confusion(result.val_metrics, arguments.plots / "confusion_matrix.png")
    return 0


def write_artifact(
    folder: Path,
    network: torch.nn.Module,
    classes: tuple[str, ...],
    preprocessing: Preprocessing,
    details: dict[str, Any],
    name: str,
    version: str,
) -> None:
    card = render_card(
        name=name, version=version, classes=classes, preprocessing=preprocessing, details=details
    )
    manifest = export_artifact(
        folder,
        network,
        classes=classes,
        preprocessing=preprocessing,
        version=version,
        details=details,
        card=card,
        name=name,
    )
    print(f"artifact {manifest.model_id} written to {folder} ({manifest.content_hash})")


def command_export(arguments: argparse.Namespace) -> int:
    from models.network import build_mobilenet_v2

    run = json.loads((arguments.run / RUN_FILE).read_text())
    checkpoint = load_checkpoint(arguments.run)
    classes = tuple(run["classes"])
    if arguments.init_note:
        run["details"]["initialisation"]["description"] = arguments.init_note
    network = build_mobilenet_v2(len(classes))
    network.load_state_dict(checkpoint["best_weights"])
    write_artifact(
        arguments.output,
        network.eval(),
        classes,
        Preprocessing.from_dict(run["preprocessing"]),
        run["details"],
        arguments.name,
        arguments.version,
    )
    return 0


def command_evaluate(arguments: argparse.Namespace) -> int:
    metrics = evaluate_artifact(
        arguments.model,
        arguments.data,
        layout=arguments.layout,
        split=arguments.split,
        device=arguments.device,
        json_path=arguments.json,
        plots=arguments.plots,
    )
    print(format_report(metrics))
    return 0


def command_cv(arguments: argparse.Namespace) -> int:
    recipe = recipe_from(arguments)
    preprocessing = Preprocessing(MEASURED_CENTER, MEASURED_WIDTH, recipe.input_size)
    data = load_all(scan(arguments.data, arguments.layout), preprocessing)
    results: list[CvResult] = []
    for protocol in arguments.protocol or list(PROTOCOLS):
        result = cross_validate(
            data, protocol, arguments.folds, recipe, arguments.init, preprocessing, arguments.device
        )
        results.append(result)
    print(markdown_table(results))
    if arguments.json is not None:
        document: dict[str, Any] = {
            r.protocol: {"summary": r.summary(), "folds": r.folds} for r in results
        }
        document["recipe"] = recipe.to_dict()
        arguments.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def command_predict(arguments: argparse.Namespace) -> int:
    result = predict_series(arguments.model, arguments.dicom, arguments.device)
    classes = result["classes"]
    print(f"model {result['model']}; probabilities in the order {', '.join(classes)}")
    for row in result["slices"]:
        cells = "  ".join(f"{value:.4f}" for value in row["probabilities"])
        print(f"  {row['file']:>16}  instance {row['instance']:4d}  {cells}")
    series = result["series"]
    cells = ", ".join(f"{n} {p:.4f}" for n, p in zip(classes, series["probabilities"], strict=True))
    print(f"series: {series['label']} ({cells}); evidence: {', '.join(series['evidence'])}")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def command_measure_window(arguments: argparse.Namespace) -> int:
    _, text = report(arguments.images, arguments.dicom)
    print(text)
    return 0


def command_convert_keras(arguments: argparse.Namespace) -> int:
    from training.keras_import import convert_file

    count = convert_file(arguments.source, arguments.target)
    print(f"wrote {count} tensors to {arguments.target}")
    return 0


COMMANDS = {
    "fit": command_fit,
    "evaluate": command_evaluate,
    "cv": command_cv,
    "export": command_export,
    "predict": command_predict,
    "measure-window": command_measure_window,
    "convert-keras": command_convert_keras,
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        return COMMANDS[arguments.command](arguments)
    except (DataError, InitError, ArtifactError, FileNotFoundError, ValueError) as error:
        print(f"pacs-train {arguments.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
