"""Detection benchmarks, run by hand: `.venv/bin/python bench/detection.py [--budget-minutes 5] [--device cpu]
[--sections quality serving]`.

Prints and writes bench/results/detection.json:
1. quality: the demo detector and segmenter (lantern/demo.py's recipes) trained on shapes within the CPU budget
   (training time measured), registered (ONNX export checked), then scored on held-out shapes images (another seed)
   as COCO scores them: mAP@0.5 (boxes; masks too for the segmenter) against the goal of 0.9, with torchvision's
   evaluation thresholds; and the same for the served answers (the registered version's pyfunc model, ONNX Runtime,
   at its own settings), what a user of the endpoint sees.
2. serving: the demo detector (trained in section 1, else briefly here) in-process as a deployment runs it (decode,
   the backend on a list of images, the answers) at several list sizes, the best being the limit; then served by
   `lantern serve` over HTTP (`/predict`, one 128 px PNG a request) at concurrency 8 and 32: served / limit.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's folder comes first on sys.path
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

# before torch: the server's OpenMP spin setting, so the in-process reference runs as served
import serving  # noqa: E402, F401
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    from lantern.demo import DEMO_RECIPES
    from registry.register import register_session_checkpoint
    from training.loop import RunOptions, train

    recipe = DEMO_RECIPES[task]
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


def in_process(uri: str, image: bytes, backend: str, device: str, seconds: float) -> list[dict]:
    """Images per second through what a deployment runs for each image, at list sizes 1-16."""
    from registry.detection_answers import detection_answer
    from registry.detection_inference import decode_side
    from registry.images import decode_image
    from registry.resolve import load_bundle
    from serving.runtime.predictors import DetectorPredictor

    bundle = load_bundle(uri)
    chosen = torch.device(device)
    predictor = (DetectorPredictor.onnx(bundle.onnx_path, chosen) if backend == "onnxruntime"
                 else DetectorPredictor.torch(bundle.module, chosen))
    settings, labels = bundle.settings, bundle.labels
    rows = []
    for size in (1, 4, 8, 16):
        def run() -> None:
            pixels = [np.asarray(decode_image(image, shorter_side=decode_side(settings))).transpose(2, 0, 1).copy()
                      for _ in range(size)]
            for found, one in zip(predictor.run_batch(pixels), pixels):
                detection_answer(found, labels, one.shape[2], one.shape[1], settings)

        run()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            count += size
        rate = count / (time.perf_counter() - start)
        rows.append({"batch": size, "images_per_s": rate})
        print(f"in-process {backend}, lists of {size}: {rate:.1f} images/s", flush=True)
    predictor.thread.close()
    return rows


def served(uri: str, image: bytes, backend: str, device: str, seconds: float, work: Path) -> list[dict]:
    import subprocess

    import yaml

    from bench.load import Process, Request, free_port, load

    config = {"name": "bench-boxes", "deployments": [{
        "name": "blue", "model": uri, "backend": backend, "device": device, "max_batch_size": 16,
        "request_settings": {"request_timeout_ms": 60000, "max_concurrent_requests_per_instance": 64,
                             "max_queue_wait_ms": 10000}}], "traffic": {"blue": 100}}
    path = work / "endpoint-detection.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    lantern = [sys.executable, "-m", "lantern"]
    server = Process([*lantern, "serve", str(path), "--port", str(port), "--reset-state"], dict(os.environ),
                     work / "lantern.log", f"http://127.0.0.1:{port}/readyz")
    key = subprocess.run([*lantern, "endpoint", "get-credentials", str(path), "--key", "primary"],
                         capture_output=True, text=True, check=True).stdout.strip()
    request = Request("/predict", image, {"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
    try:
        rows = []
        for concurrency in (8, 32):
            row = load(f"http://127.0.0.1:{port}", request, concurrency, seconds, max(1, (os.cpu_count() or 2) // 4))
            rows.append(row)
            print(f"served {backend}, concurrency {concurrency}: {row['requests_per_s']:.1f} images/s, p50 "
                  f"{1000 * row['p50_s']:.0f} ms, errors {row['errors']}", flush=True)
        return rows
    finally:
        server.stop()


def serving_section(uri: str | None, device: str, seconds: float, work: Path) -> dict:
    from lantern.demo import DEMO_RECIPES
    from registry.register import register_session_checkpoint
    from training.loop import RunOptions, train
    from training.shapes_instances import InstanceShapesConfig, make_instance_sample

    if uri is None:  # a briefly trained detector: throughput hardly depends on how well it detects
        recipe = DEMO_RECIPES["object_detection"]
        session_dir = work / "serving-session"
        train(session_dir, {"data": "shapes:400", **recipe.config},
              RunOptions(iterations=300, checkpoint_interval=300, device=device, mlflow=False))
        uri = register_session_checkpoint("bench-serving", session_dir).uri
    buffer = io.BytesIO()
    make_instance_sample(InstanceShapesConfig(image_size=128, seed=HELD_OUT_SEED), 7).image.save(buffer, "PNG")
    image = buffer.getvalue()
    result = {"model": uri}
    for backend in ("onnxruntime", "torch"):
        limit = in_process(uri, image, backend, device, seconds)
        levels = served(uri, image, backend, device, seconds, work)
        best = max(row["images_per_s"] for row in limit)
        ratio = max(row["requests_per_s"] for row in levels) / best
        print(f"{backend}: served {ratio:.2f}x the in-process limit ({best:.1f} images/s at the best list size; "
              "goal >= 0.9)", flush=True)
        result[backend] = {"in_process": limit, "served": levels, "served_over_limit": ratio}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=["object_detection", "instance_segmentation"])
    parser.add_argument("--sections", nargs="+", default=["quality", "serving"], choices=["quality", "serving"])
    parser.add_argument("--seconds", type=float, default=15.0, help="each throughput measurement's length")
    args = parser.parse_args()
    result: dict = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "device": args.device,
                    "goal_map_50": GOAL_MAP_50}
    with tempfile.TemporaryDirectory(prefix="lantern-bench-detection-") as folder:
        os.environ["LANTERN_HOME"] = folder
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        uri = None
        if "quality" in args.sections:
            result["quality"] = [quality(task, args.budget_minutes, args.device, Path(folder)) for task in args.tasks]
            uri = next(("models:/bench-object_detection/1" for row in result["quality"]
                        if row["task"] == "object_detection"), None)
        if "serving" in args.sections:
            result["serving"] = serving_section(uri, args.device, args.seconds, Path(folder))
    RESULTS.parent.mkdir(exist_ok=True)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # a section run alone keeps the others
    RESULTS.write_text(json.dumps({**earlier, **result}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
