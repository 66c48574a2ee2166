"""The endpoint configuration: every rule gives a message naming the problem; `lantern serve` checks the registry."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.config import ConfigError, load_endpoint_config, parse_endpoint_config
from serving.control.auth import KeyCheck, ScoringKeys, bearer_token, credentials_path, key_digest, scoring_keys
from support.common import LABELS, PROJECT_ROOT, SMALL_SETTINGS, lantern_executable


def config(**changes) -> dict:
    values = {"name": "shop", "deployments": [{"name": "blue", "model": "models:/m/1"},
                                              {"name": "green", "model": "models:/m@challenger"}],
              "traffic": {"blue": 100}}
    values.update(changes)
    return values


def test_defaults_follow_the_spec() -> None:
    parsed = parse_endpoint_config(config())
    blue = parsed.deployment("blue")
    assert parsed.auth_mode == "key"
    assert blue.request_settings.request_timeout_ms == 5000
    assert blue.request_settings.max_concurrent_requests_per_instance == 1
    assert blue.request_settings.max_queue_wait_ms == 500
    assert blue.readiness_probe.model_dump() == {"initial_delay": 10, "period": 10, "timeout": 2,
                                                 "success_threshold": 1, "failure_threshold": 30}
    assert blue.device == "auto" and blue.backend == "onnxruntime"


def test_the_shipped_example_is_valid() -> None:
    example = load_endpoint_config(PROJECT_ROOT / "endpoint.yaml")
    assert example.traffic == {"blue": 100} and example.deployments[0].model == "models:/shapes-demo@champion"


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "colour: unknown key"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1", "gpu": True}]}, "gpu: unknown key"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1", "instance_count": 3}]},
     "instance_count: unknown key (every worker of `lantern serve` runs each deployment, so the workers are its "
     "instances: size the endpoint with `lantern serve --workers N`)"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1", "instance_type": "Standard_NC6s_v3"}]},
     "instance_type: unknown key (choose the hardware with `device`"),
    ({"$schema": "https://example.com/managedOnlineEndpoint.schema.json"}, "$schema: unknown key (Lantern checks"),
    ({"traffic": {"blue": 60, "green": 30}}, "sum to 100 (or all be 0); they sum to 90"),
    ({"traffic": {"blue": 100, "red": 0}}, "unknown deployment(s) red"),
    ({"traffic": {"blue": 100.0}}, "valid integer"),
    ({"traffic": {"blue": "100"}}, "valid integer"),
    ({"traffic": {"blue": 120, "green": -20}}, "from 0 to 100"),
    ({"mirror_traffic": {"green": 60}}, "at most 50 percent"),
    ({"mirror_traffic": {"blue": 10}}, "live or mirrored traffic, never both"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1"}] * 2}, "must be unique"),
    ({"deployments": [{"name": "Blue!", "model": "models:/m/1"}]}, "not a valid name"),
    ({"deployments": [{"name": "blue", "model": "https://example.com/model.onnx"}]}, "models come only from the "
                                                                                     "registry"),
    ({"deployments": [{"name": "blue", "model": "models:/m"}]}, "models:/NAME/VERSION"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1", "device": "tpu"}]}, "unknown device 'tpu'"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1", "backend": "tensorrt"}]}, "onnxruntime"),
    ({"deployments": [{"name": "blue", "model": "models:/m/1",
                       "request_settings": {"request_timeout_ms": 200_000}}]}, "less than or equal to 180000"),
    ({"auth_mode": "aml_token"}, "auth_mode"),
    ({"limits": {"explanation_threads": 0}}, "limits.explanation_threads: Input should be greater than or equal to 1"),
    ({"cors": {"allow_origins": ["https://app.example.com/"]}},
     "cors.allow_origins: 'https://app.example.com/' is not an origin: an origin is a scheme, host and optional port "
     "as a browser sends it, such as https://app.example.com:8443 (without the path: https://app.example.com)"),
    ({"cors": {"allow_origins": ["app.example.com"]}}, "'app.example.com' is not an origin"),
    ({"cors": {"allow_origins": ["*", "https://app.example.com"]}}, '"*" allows every origin: list it alone'),
    ({"cors": {"allow_origins": []}}, "cors.allow_origins: List should have at least 1 item"),
    ({"cors": {"allow_origins": ["*"], "allow_credentials": True}}, "cors.allow_credentials: unknown key"),
    ({"cors": {"allow_origins": ["*"], "allow_headers": ["X Client"]}},
     "cors.allow_headers: 'X Client' is not a header name"),
    ({"cors": {"allow_origins": ["*"], "allow_headers": ["*"]}}, '"*" is not accepted: name the headers'),
])
def test_invalid_configurations_name_the_problem(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_endpoint_config(config(**changes))
    assert message in str(error.value)


@pytest.mark.parametrize("bad", ["blue\n", "blue\r\n", "blue\x00", "blu\u00e9", "\u0628lue", "blue\u2028",
                                 " blue", "blue "])
def test_names_and_references_are_checked_whole(bad: str) -> None:
    """`$` matches before a final newline: "blue\n" was a valid name (and with traffic on it, every answer failed on
    its header). Every name, model reference, device, origin and header name is matched whole, in ASCII."""
    cases = [
        ({"name": bad.replace("blue", "shop")}, "not a valid name"),
        ({"deployments": [{"name": bad, "model": "models:/m/1"}], "traffic": {}}, "not a valid name"),
        ({"deployments": [{"name": "blue", "model": "models:/m/1".replace("m", bad, 1)}]}, "models:/NAME/VERSION"),
        ({"deployments": [{"name": "blue", "model": "models:/m@" + bad}]}, "models:/NAME/VERSION"),
        ({"deployments": [{"name": "blue", "model": "models:/m/1", "device": bad.replace("blue", "cpu")}]},
         "unknown device"),
        ({"cors": {"allow_origins": [bad.replace("blue", "https://app.example.com")]}}, "is not an origin"),
    ]
    if bad.strip() == bad:  # a header name's spaces are refused by the same rule
        cases.append(({"cors": {"allow_origins": ["*"], "allow_headers": [bad.replace("blue", "X-Client")]}},
                      "is not a header name"))
    for changes, message in cases:
        with pytest.raises(ConfigError) as error:
            parse_endpoint_config(config(**changes))
        assert message in str(error.value), (changes, str(error.value))


@pytest.mark.parametrize("text", ["models:/m/1\n", "models:/m\x00/1", "models:/m/\u0661", "m/1\n", "m@a\x00"])
def test_model_references_with_control_characters_or_other_digits_are_refused(text: str) -> None:
    from registry.errors import LanternError
    from registry.references import parse_model_ref, validate_alias

    with pytest.raises(LanternError, match="not a registered model reference"):
        parse_model_ref(text)
    with pytest.raises(LanternError, match="invalid alias"):
        validate_alias("champion\n")


def test_yaml_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_endpoint_config(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_endpoint_config(tmp_path / "missing.yaml")


def test_scoring_keys_from_environment_or_generated_once(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANTERN_API_KEY", raising=False)
    monkeypatch.delenv("LANTERN_API_KEY_SECONDARY", raising=False)
    generated = scoring_keys("shop")
    assert generated.source == "generated" and generated.primary != generated.secondary
    assert credentials_path("shop").stat().st_mode & 0o777 == 0o600
    again = scoring_keys("shop")
    assert (again.primary, again.secondary, again.source) == (generated.primary, generated.secondary, "file")
    monkeypatch.setenv("LANTERN_API_KEY", "k1")
    monkeypatch.setenv("LANTERN_API_KEY_SECONDARY", "k2")
    assert scoring_keys("shop") == ScoringKeys("k1", "k2", "environment")
    check = KeyCheck([key_digest("k1"), key_digest("k2")])
    assert check.accepts("k1") and check.accepts("k2") and not check.accepts("k3") and not check.accepts("")
    assert bearer_token("Bearer abc ") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None


def test_serve_checks_the_registry_before_starting(store: str, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    from registry.register import register_checkpoint

    register_checkpoint("m", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    path = tmp_path / "endpoint.yaml"
    path.write_text(yaml.safe_dump(config(deployments=[
        {"name": "blue", "model": "models:/m/1", "settings": {"valid_crop_size": 64, "confidence_score_threshold_"
                                                                                   "multilabel": 0.3}},
        {"name": "green", "model": "models:/m/7"},
        {"name": "red", "model": "models:/nobody@champion"},
    ])))
    elsewhere = tmp_path / "elsewhere"  # no endpoint.yaml in the working directory: the file is found by its path
    elsewhere.mkdir()
    out = subprocess.run([lantern_executable(), "serve", str(path), "--port", "1"], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120, cwd=elsewhere)
    assert out.returncode == 2, out.stdout + out.stderr
    message = " ".join(out.stderr.split())
    assert "deployment blue" in message and "confidence_score_threshold_multilabel: unknown setting" in message
    assert "deployment green: models:/m/7 does not exist" in message
    assert "deployment red: no registered model named 'nobody'" in message


def test_a_restart_says_which_version_a_pinned_alias_serves_and_whether_it_moved(store: str,
                                                                               checkpoints: dict[str, Path]) -> None:
    from registry.register import register_checkpoint
    from serving.control.checks import check_against_registry

    register_checkpoint("pin", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    endpoint = parse_endpoint_config(config(deployments=[{"name": "blue", "model": "models:/pin@champion"}],
                                            traffic={"blue": 100}))
    assert check_against_registry(endpoint, store, {"blue": "models:/pin/1"}) == [
        "blue: models:/pin@champion -> models:/pin/1 (small_cnn, multiclass) (its alias as resolved when the "
        "deployment was made or last given its model)"]
    register_checkpoint("pin", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    assert check_against_registry(endpoint, store, {"blue": "models:/pin/1"}) == [
        "blue: models:/pin@champion -> models:/pin/1 (small_cnn, multiclass) (its alias names models:/pin/2 now: "
        "`lantern deploy update blue --model models:/pin@champion` moves it there)"]
    assert check_against_registry(endpoint, store) == ["blue: models:/pin@champion -> models:/pin/2 (small_cnn, "
                                                       "multiclass)"]  # a first start: resolved now


def test_serve_names_an_address_it_cannot_listen_on(store: str, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """A port in use, or an address this machine does not have, is one line naming it (BentoML's own start ends with
    a traceback), and nothing is written: the endpoint's state is created by the first start that serves."""
    import socket

    from registry.register import register_checkpoint
    from serving.control.state import StateStore

    register_checkpoint("m", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    path = tmp_path / "endpoint.yaml"
    path.write_text(yaml.safe_dump(config(deployments=[{"name": "blue", "model": "models:/m/1"}])))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for options, message in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use "
                                                          "(another server listens there; stop it or choose another "
                                                          "--port)"),
                                 (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid")):
            out = subprocess.run([lantern_executable(), "serve", str(path), *options], capture_output=True,
                                 text=True, env=dict(os.environ), timeout=120)
            assert out.returncode == 2, out.stdout + out.stderr
            assert message in " ".join(out.stderr.split()) and "Traceback" not in out.stderr, out.stderr
    assert StateStore("shop").read() is None


def test_tls_files_that_do_not_load_together_are_named(tmp_path: Path) -> None:
    from registry.errors import LanternError
    from serving.control.checks import check_tls_files
    from support.servers import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path / "one")
    _, other_key = self_signed_certificate(tmp_path / "two")
    encrypted_cert, encrypted_key = self_signed_certificate(tmp_path / "three", password=b"secret")
    combined = tmp_path / "combined.pem"  # the key in the certificate's file
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    check_tls_files(str(cert), str(key))
    check_tls_files(str(combined), None)
    check_tls_files(None, None)
    for certfile, keyfile, message in (
            (str(cert), None, f"the TLS certificate {cert} and the key in it (no --ssl-keyfile) do not load together"),
            (None, str(key), "--ssl-keyfile needs --ssl-certfile"),
            (str(cert), str(other_key), "key values mismatch"),
            (str(encrypted_cert), str(encrypted_key), "the private key is encrypted"),
            (str(key), str(cert), f"the TLS certificate {key} and key {cert} do not load together")):
        with pytest.raises(LanternError, match=re.escape(message)):
            check_tls_files(certfile, keyfile)


def test_a_traffic_split_over_different_tasks_is_refused_at_start(store: str, checkpoints: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """Deployments of a classifier and of a detector may share an endpoint (a pinned request reaches either), but
    not its live or mirrored traffic: they answer in different formats."""
    from safetensors.torch import save_file

    from registry.register import register_checkpoint
    from registry.spec import build_module, make_spec
    from serving.config import ConfigError
    from serving.control.checks import check_against_registry

    register_checkpoint("classes", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    detector = build_module(make_spec("small_detector", len(LABELS), "object_detection"))
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(tmp_path / "detector.safetensors"))
    register_checkpoint("boxes", tmp_path / "detector.safetensors", "small_detector", LABELS, "object_detection",
                        {"min_size": 64, "max_size": 64})
    deployments = [{"name": "blue", "model": "models:/classes/1"}, {"name": "green", "model": "models:/boxes/1"}]
    lines = check_against_registry(parse_endpoint_config(config(deployments=deployments, traffic={"blue": 100})),
                                   store)
    assert lines[1] == "green: models:/boxes/1 -> models:/boxes/1 (small_detector, object_detection)"
    for split in ({"traffic": {"blue": 50, "green": 50}}, {"traffic": {"blue": 100}, "mirror_traffic": {"green": 10}}):
        with pytest.raises(ConfigError) as refused:
            check_against_registry(parse_endpoint_config(config(deployments=deployments, **split)), store)
        assert "the traffic (live and mirrored) goes to deployments of one task" in str(refused.value)
        assert "blue serve multiclass" in str(refused.value) and "green serve object_detection" in str(refused.value)
