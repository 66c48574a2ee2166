"""Reading checkpoints safely (safetensors, or a state dict through `torch.load(weights_only=True)`) and checking
that their weights fit a model."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from registry.errors import CheckpointError

# Keys under which common training code nests the state dict (Lantern's own training checkpoints use "model").
_NESTED_KEYS = ("model", "state_dict", "model_state_dict")


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path} does not hold a state dict (got {type(obj).__name__}); save model.state_dict() or safetensors"
        )
    bad = [key for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries must map names to tensors; offending keys: {bad[:5]!r}")
    if all(key.startswith("module.") for key in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return obj


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load weights from a safetensors file or a torch state dict; never unpickles arbitrary objects."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file not found: {file}")
    with file.open("rb") as handle:
        head = handle.read(16)
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {file}: it needs arbitrary unpickling, which could run code "
            f"({str(error).splitlines()[0][:200]}). Save the weights as safetensors or as model.state_dict() "
            "with torch.save, and register that file."
        ) from None
    except Exception as error:  # the weights-only unpickler fails on garbage with assorted error types
        kind = "a zip" if head.startswith(b"PK") else "an unrecognised"
        raise CheckpointError(f"{file} is not a torch checkpoint ({kind} file: {error})") from None
    return _unwrap(obj, file)


def fit_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load `state_dict` into `model`, refusing missing or unexpected keys and shape mismatches by name."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:8])}")
    if problems:
        raise CheckpointError("the checkpoint's weights do not fit the model: " + " | ".join(problems))
    model.load_state_dict({key: state_dict[key].to(expected[key].dtype) for key in expected})
