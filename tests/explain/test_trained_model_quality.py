"""Explanations of a model trained on shapes: completeness, the pointing game against the objects' masks, and
`lantern explain` writing the PNG and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy import ndimage
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from explain.attribute import attribute
from registry.model_files import WEIGHTS, ModelFiles
from registry.preprocess import Preprocess
from registry.spec import IMAGENET, build_module
from training.datasets import load_uint8
from training.loop import TrainResult
from training.session import Session


def _trained_model(trained: TrainResult) -> tuple[nn.Module, Preprocess, list, object, object]:
    from training.sources import load_data

    session = Session(trained.session_dir)
    meta = session.read_meta()
    checkpoint = session.latest().path
    model = build_module(meta.spec)
    model.load_state_dict(load_file(str(checkpoint / WEIGHTS)))
    settings = ModelFiles.in_dir(checkpoint).read_settings(meta.spec.task)
    validation = load_data(meta.config, session.dir / "data").val
    return model.eval(), Preprocess.for_model(meta.spec, settings), validation, meta.spec, settings


def test_completeness_below_one_percent_with_gausslegendre_50(trained_shapes: TrainResult,
                                                              capsys: pytest.CaptureFixture) -> None:
    model, preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    errors = [
        attribute(model, preprocess(load_uint8(example.path)), "integrated_gradients",
                  {"n_steps": 50, "approximation_method": "gausslegendre"}, **IMAGENET).fidelity.completeness_error[0]
        for example in validation[:30]
    ]
    with capsys.disabled():
        print(f"\nIG completeness error, gausslegendre 50 steps, trained small CNN, 30 validation images: "
              f"median {np.median(errors):.2%}, mean {np.mean(errors):.2%}, max {np.max(errors):.2%}")
    assert np.median(errors) < 0.01


POINTING_TOLERANCE_AT_224 = 15


def _peak(scores: np.ndarray) -> tuple[int, int]:
    """The maximum's position; when a whole region ties for it (XRAI gives one value per region), the region's
    pixel nearest to its centroid rather than its first pixel in raster order."""
    ties = np.argwhere(scores == scores.max())
    centre = ties.mean(axis=0)
    row, col = ties[np.argmin(((ties - centre) ** 2).sum(axis=1))]
    return int(row), int(col)


def _crop_mask(mask_path: Path, resize: int, crop: int) -> np.ndarray:
    mask = torch.from_numpy(np.array(Image.open(mask_path)))[None]  # a copy: PIL's buffer is read-only
    mask = TF.resize(mask, [resize], interpolation=InterpolationMode.NEAREST)
    return TF.center_crop(mask, [crop, crop])[0].numpy()


@pytest.mark.parametrize("method, count, params", [
    ("guided_gradcam", 150, None),
    ("integrated_gradients", 150, None),
    ("xrai", 40, {"n_steps": 20}),  # XRAI segments every image at 224 px: fewer images keep the suite short
])
def test_pointing_game_on_the_trained_shapes_model(trained_shapes: TrainResult, method: str, count: int,
                                                    params: dict | None, capsys: pytest.CaptureFixture) -> None:
    model, preprocess, validation, spec, settings = _trained_model(trained_shapes)
    validation = validation[:count]
    tolerance = POINTING_TOLERANCE_AT_224 * settings.valid_crop_size / 224  # TorchRay's 15 px, scaled to the crop
    hits = strict_hits = 0
    for example in validation:
        cropped = preprocess.crop(load_uint8(example.path))
        x = preprocess.normalize(cropped)
        explanation = attribute(model, x, method, params, gradcam_layer=spec.gradcam_layer,
                                image=cropped.permute(1, 2, 0).numpy(), **IMAGENET)
        raw = explanation.attributions[0].numpy()  # not the display scale, which saturates the top values
        scores = raw[0] if method == "xrai" else np.abs(raw.sum(axis=0))
        peak = _peak(scores)
        mask = _crop_mask(example.mask, settings.valid_resize_size, settings.valid_crop_size) > 0
        distance = ndimage.distance_transform_edt(~mask)[peak]  # 0 inside the object
        hits += int(distance <= tolerance)
        strict_hits += int(distance == 0)
    rate = hits / len(validation)
    with capsys.disabled():
        print(f"\npointing game, {method}, trained small CNN, {len(validation)} validation images: {rate:.1%} "
              f"within {tolerance:.1f} px of the object (TorchRay's 15 px at 224), {strict_hits / len(validation):.1%} "
              "inside it")
    assert rate >= 0.90
    assert json.loads(explanation.fidelity.model_dump_json())["method"] == method


def test_explain_command_writes_the_png_and_the_report(trained_shapes: TrainResult, store: str, tmp_path: Path) -> None:
    import subprocess

    from registry.register import register_session_checkpoint
    from support.common import lantern_executable, lantern_here

    registered = register_session_checkpoint("explained", trained_shapes.session_dir, alias="champion")
    _model, _preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    example = validation[0]
    out, npy = tmp_path / "heatmap.png", tmp_path / "attributions.npy"
    done = subprocess.run(
        [lantern_executable(), "explain", str(example.path), "--model", "models:/explained@champion",
         "--method", "integrated_gradients", "--param", "n_steps=16", "--param", "approximation_method=gausslegendre",
         "--out", str(out), "--attributions", str(npy)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == registered.uri and report["labels"] == list(example.labels)
    assert report["params"]["n_steps"] == 16 and report["completeness_error"][0] >= 0
    assert Image.open(out).size == (512, 512)  # 64 px panels enlarged 4x
    assert np.load(npy).shape == (1, 3, 64, 64)

    # the refusals in this process (lantern_here): the same command and exit status, without a process's imports
    refused = lantern_here("explain", str(example.path), "--model", "models:/explained@champion",
                           "--target", "hexagon", exit_code=2)
    assert "unknown label(s) hexagon" in refused.stderr
    bad_param = lantern_here("explain", str(example.path), "--model", "models:/explained@champion",
                             "--param", "n_steps=1", exit_code=2)
    assert "n_steps: Input should be greater than or equal to 2" in bad_param.stderr


def test_explain_command_explains_a_folder_into_out_dir(trained_shapes: TrainResult, store: str,
                                                        tmp_path: Path) -> None:
    """Several images (a folder, plus a file with the same stem elsewhere) go to --out-dir: a PNG and an .npy per
    image, one report line each; an unreadable file is reported and skipped (exit status 1), not the end of the run."""
    import shutil
    import subprocess

    from registry.register import register_session_checkpoint
    from support.common import lantern_executable, lantern_here

    register_session_checkpoint("batch-explained", trained_shapes.session_dir, alias="champion")
    _model, _preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    folder, other = tmp_path / "images", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    for example in validation[:3]:
        shutil.copy(example.path, folder / example.path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image: left out by its suffix")
    shutil.copy(validation[3].path, other / validation[0].path.name)  # the same stem as the folder's first image
    out_dir = tmp_path / "explained"
    command = [lantern_executable(), "explain", str(folder), str(other / validation[0].path.name),
               "--model", "models:/batch-explained@champion", "--method", "guided_backprop"]
    done = subprocess.run(command + ["--out-dir", str(out_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one image failed; the others were explained
    assert "Warning" not in done.stderr, done.stderr  # captum's two warnings per guided explanation are expected noise
    summary = json.loads(done.stdout)
    assert summary["images"] == 5 and summary["explained"] == 4
    assert [Path(f["image"]).name for f in summary["failed"]] == ["broken.png"]
    assert "not a readable image" in summary["failed"][0]["error"]
    reports = [json.loads(line) for line in (out_dir / "reports.jsonl").read_text().splitlines()]
    assert len(reports) == 5 and sum("error" in r for r in reports) == 1
    explained = [r for r in reports if "error" not in r]
    stems = [validation[0].path.stem, validation[1].path.stem, validation[2].path.stem,
             f"{validation[0].path.stem}-2"]  # sorted folder first, then the file with the repeated stem
    assert sorted(r["attributions"] for r in explained) == sorted(f"{stem}.npy" for stem in stems)
    for report in explained:
        assert report["method"] == "guided_backprop" and len(report["labels"]) == 1
        assert Image.open(out_dir / report["visualizations"][0]).size == (512, 512)
        assert np.load(out_dir / report["attributions"]).shape == (1, 3, 64, 64)
    assert "guided_backprop 5/5" in done.stderr  # one progress line per image when stderr is not a terminal

    # the refusals in this process (lantern_here): the same command and exit status, without a process's imports
    several = lantern_here(*command[1:], "--out", str(tmp_path / "x.png"), exit_code=2)
    assert "5 images to explain: give --out-dir DIR" in several.stderr
    bad = lantern_here(*command[1:], "--out-dir", str(out_dir), "--param", "n_steps=8", exit_code=2)
    assert "n_steps: not a parameter of guided_backprop" in bad.stderr
