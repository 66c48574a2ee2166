"""Checkpoint formats and the refusals of registry.checkpoint."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from registry.checkpoint import fit_state_dict, load_state_dict
from registry.errors import CheckpointError
from registry.small_cnn import SmallCNN


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_and_safetensors_load_the_same_weights(checkpoints, small_model):
    expected = small_model.state_dict()
    assert _same(load_state_dict(checkpoints["pt"]), expected)
    assert _same(load_state_dict(checkpoints["safetensors"]), expected)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "model_state_dict"])
def test_nested_state_dict_is_unwrapped(tmp_path, small_model, wrap):
    path = tmp_path / "nested.pt"
    torch.save({wrap: small_model.state_dict(), "epoch": 3}, path)
    assert _same(load_state_dict(path), small_model.state_dict())


def test_data_parallel_prefix_is_stripped(tmp_path, small_model):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in small_model.state_dict().items()}, path)
    assert _same(load_state_dict(path), small_model.state_dict())


def test_pickled_module_is_refused(tmp_path, small_model):
    path = tmp_path / "whole-model.pt"
    torch.save(small_model, path)  # a full pickled nn.Module needs arbitrary unpickling
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_state_dict(path)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/lantern-should-never-exist"),))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_state_dict(path)
    assert not Path("/tmp/lantern-should-never-exist").exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(collections.OrderedDict(weight=torch.zeros(1), note="hello"), path)
    with pytest.raises(CheckpointError, match="offending keys: \\['note'\\]"):
        load_state_dict(path)


def test_garbage_and_missing_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_state_dict(garbage)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_state_dict(bad_st)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "absent.pt")


def test_missing_unexpected_and_mismatched_keys_are_named(small_model):
    state = dict(small_model.state_dict())
    del state["classifier.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["classifier.weight"] = torch.zeros(5, 128)
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(SmallCNN(3), state)
    message = str(info.value)
    assert "missing key(s): classifier.bias" in message
    assert "unexpected key(s): extra.weight" in message
    assert "classifier.weight: checkpoint (5, 128) vs model (3, 128)" in message


def test_fit_loads_the_weights(small_model):
    model = SmallCNN(3)
    fit_state_dict(model, small_model.state_dict())
    assert _same(model.state_dict(), small_model.state_dict())
