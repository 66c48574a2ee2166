"""Detection benchmarks, run by hand: `.venv/bin/python bench/detection.py [--budget-minutes 5] [--device cpu]`.

Prints and writes bench/results/detection.json:
1. quality: the demo detector and segmenter (lantern/demo.py's recipes) trained on shapes within the CPU budget
   (training time measured), registered (ONNX export checked), then scored on held-out shapes images (another seed)
   as COCO scores them: mAP@0.5 (boxes; masks too for the segmenter) against the goal of 0.9, with torchvision's
   evaluation thresholds; and the same for the served answers (the registered version's pyfunc model, ONNX Runtime,
   at its own settings), what a user of the endpoint sees.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's folder comes first on sys.path
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "detection.json"
GOAL_MAP_50 = 0.9
HELD_OUT_SEED = 2026
HELD_OUT_COUNT = 300


def held_out(task: str, image_size: int, folder: Path) -> Path:
    from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

    return write_instance_shapes_dataset(folder, InstanceShapesConfig(count=HELD_OUT_COUNT, image_size=image_size,
                                                                      seed=HELD_OUT_SEED, task=task))


def score_module(uri: str, index: Path, task: str) -> dict[str, float]:
    """mAP of the version's torch module on the held-out images, at torchvision's evaluation thresholds."""
    from registry.resolve import load_bundle
    from training.detection_data import DetectionDataset, collate
    from training.detection_index import read_detection_index
    from training.detection_metrics import DetectionScores

    bundle = load_bundle(uri)
    model = bundle.module.eval()
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.05, 100
    masks = task == "instance_segmentation"
    scores = DetectionScores(bundle.labels, masks)
    loader = DataLoader(DetectionDataset(read_detection_index(index, task), bundle.labels, masks), batch_size=16,
                        collate_fn=collate)
    with torch.inference_mode():
        for images, targets in loader:
            scores.update(model([image.float() / 255 for image in images]), targets)
    return scores.compute("held_out")


def score_served(uri: str, index: Path, task: str) -> dict[str, float]:
    """mAP of the version's pyfunc answers (ONNX Runtime, the version's own settings) on the held-out images."""
    import mlflow.pyfunc
    import pandas as pd

    from registry.resolve import load_bundle
    from training.detection_data import DetectionDataset
    from training.detection_index import read_detection_index
    from training.detection_metrics import DetectionScores

    labels = load_bundle(uri).labels
    examples = read_detection_index(index, task)
    model = mlflow.pyfunc.load_model(uri)
    scores = DetectionScores(labels, masks=False)
    dataset = DetectionDataset(examples, labels, masks=False)
    for start in range(0, len(examples), 32):
        chunk = examples[start:start + 32]
        encoded = [base64.b64encode(example.path.read_bytes()).decode() for example in chunk]
        answers = model.predict(pd.DataFrame({"image": encoded}))["boxes"]
        detections, targets = [], []
        for offset, boxes in enumerate(answers):
            image, target = dataset[start + offset]
            height, width = image.shape[1:]
            detections.append({
                "boxes": torch.tensor([[b["box"]["topX"] * width, b["box"]["topY"] * height,
                                        b["box"]["bottomX"] * width, b["box"]["bottomY"] * height]
                                       for b in boxes], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([b["score"] for b in boxes], dtype=torch.float32),
                "labels": torch.tensor([labels.index(b["label"]) + 1 for b in boxes], dtype=torch.int64)})
            targets.append(target)
        scores.update(detections, targets)
    return scores.compute("served")


def quality(task: str, budget_minutes: float, device: str, work: Path) -> dict:
    from lantern.demo import DEMO_DETECTION
    from registry.register import register_session_checkpoint
    from training.loop import RunOptions, train

    recipe = DEMO_DETECTION[task]
    session_dir = work / f"{task}-session"
    start = time.perf_counter()
    result = train(session_dir, {"data": f"shapes:{recipe.count}", **recipe.config},
                   RunOptions(iterations=recipe.iterations, checkpoint_interval=recipe.iterations, device=device,
                              mlflow=False))
    training_s = time.perf_counter() - start
    registered = register_session_checkpoint(f"bench-{task}", session_dir, result.iteration)
    index = held_out(task, recipe.config["image_size"], work / f"{task}-held-out")
    module_scores = score_module(registered.uri, index, task)
    served_scores = score_served(registered.uri, index, task)
    row = {"task": task, "arch": recipe.config["arch"], "iterations": result.iteration,
           "training_s": round(training_s, 1), "budget_s": budget_minutes * 60,
           "onnx_max_abs_diff": registered.onnx_max_abs_diff, **module_scores, **served_scores}
    map_50 = module_scores["held_out_map_50"]
    print(f"{task}: {recipe.config['arch']} {result.iteration} iterations in {training_s / 60:.1f} min "
          f"(budget {budget_minutes:.0f}); held-out box mAP@0.5 {map_50:.3f} ({map_50 / GOAL_MAP_50:.2f}x the goal "
          f"of {GOAL_MAP_50}), mAP@[.5:.95] {module_scores['held_out_map']:.3f}"
          + (f", mask mAP@0.5 {module_scores['held_out_mask_map_50']:.3f}" if "held_out_mask_map_50" in module_scores
             else "")
          + f"; served answers (ONNX, box_score_thresh 0.3) mAP@0.5 {served_scores['served_map_50']:.3f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=["object_detection", "instance_segmentation"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lantern-bench-detection-") as folder:
        import os

        os.environ["LANTERN_HOME"] = folder
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        rows = [quality(task, args.budget_minutes, args.device, Path(folder)) for task in args.tasks]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": torch.get_num_threads(),
                                   "device": args.device, "goal_map_50": GOAL_MAP_50, "quality": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
