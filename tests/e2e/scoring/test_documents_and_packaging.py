"""The OpenAPI document, the bento's contents, and HTTPS beside another server."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from support.common import PROJECT_ROOT, lantern_executable
from support.operations import predict
from support.servers import Server, png_bytes


def references(node: object) -> list[str]:
    """Every `$ref` in an OpenAPI document."""
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    return []


def test_openapi_describes_every_route_in_a_valid_document(server: Server) -> None:
    """The document validates as OpenAPI 3.1 (client generators and schemathesis refused BentoML's: "3.0.2" around
    JSON Schema 2020-12 forms such as a numeric exclusiveMinimum), at /docs.json as at /openapi.json."""
    from openapi_spec_validator import validate

    bentoml_document = httpx.get(f"{server.url}/docs.json").json()  # where BentoML serves its document
    document = httpx.get(f"{server.url}/openapi.json").json()  # the one /docs shows
    assert bentoml_document == document and document["openapi"] == "3.1.0"
    validate(document)
    for checked in (bentoml_document, document):
        for path in ("/score", "/predict", "/explain", "/manage/deployments"):
            assert path in checked["paths"]
        schemas = checked["components"]["schemas"]
        dangling = {ref for ref in references(checked) if ref.removeprefix("#/components/schemas/") not in schemas}
        assert not dangling, dangling
        bodies = {path: checked["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                  for path in ("/score", "/explain", "/manage/deployments")}
        assert {"input_data"} <= set(bodies["/score"]["properties"])
        rows = bodies["/score"]["properties"]["input_data"]["properties"]["data"]["items"]["anyOf"]
        row = next(branch["contentSchema"] for branch in rows if "contentSchema" in branch)  # a data string's JSON
        assert {"image_base64", "model_explainability", "xai_parameters"} <= set(row["properties"])
        assert "xai_algorithm" in row["properties"]["xai_parameters"]["properties"]
        assert {"image_base64", "method"} <= set(bodies["/explain"]["properties"])
        assert {"name", "model", "request_settings"} <= set(bodies["/manage/deployments"]["properties"])
    for path in ("/livez", "/readyz", "/metrics"):
        assert path in bentoml_document["paths"]
        assert document["paths"][path]["get"]["security"] == []  # health and metrics need no key
    paths = document["paths"]
    score = paths["/score"]["post"]
    assert {"401", "404", "405", "408", "413", "424", "429", "503"} <= set(score["responses"])
    assert score["security"] == [{"scoringKey": []}]
    for path in ("/score", "/predict", "/explain"):  # the headers every answer carries
        responses = paths[path]["post"]["responses"]
        assert {"x-request-id", "x-lantern-deployment", "x-lantern-model-version"} <= set(responses["200"]["headers"])
        assert "x-request-id" in responses["404"]["headers"]
        assert ("content-encoding" in responses["200"]["headers"]) == (path != "/predict")  # gzip'd explanations
    for path in ("/manage/endpoint", "/manage/deployments", "/manage/deployments/{name}", "/manage/traffic",
                 "/manage/mirror-traffic", "/manage/keys/{kind}/regenerate"):
        for operation in paths[path].values():
            assert operation["security"] == [{"adminKey": []}] and "403" in operation["responses"]
    assert set(paths["/manage/deployments/{name}"]) == {"get", "patch", "delete"}


def test_bento_build_includes_the_endpoint_configuration(tmp_path: Path) -> None:
    root = PROJECT_ROOT
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([str(Path(lantern_executable()).with_name("bentoml")), "build", str(root), "--output", "tag"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    bentos = list((tmp_path / "bentoml" / "bentos" / "lantern").glob("*/bento.yaml"))
    assert len(bentos) == 1
    source = bentos[0].parent / "src"
    assert (source / "endpoint.yaml").read_text() == (root / "endpoint.yaml").read_text()
    assert (source / "serving" / "service.py").exists()
    assert (source / "serving" / "http" / "page.html").read_text() == (root / "serving" / "http" / "page.html").read_text()
    assert "serving.service:Lantern" in bentos[0].read_text()
    required = {Requirement(line).name.lower() for line in
                (bentos[0].parent / "env" / "python" / "requirements.txt").read_text().splitlines() if line.strip()}
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {Requirement(line).name.lower() for line in dependencies} - required
    assert not missing, f"the bento would be installed without {missing}"


def test_serve_over_https_beside_another_server_each_keeping_its_own_counts(server: Server, key: str,
                                                                           tmp_path: Path) -> None:
    """`--ssl-certfile/--ssl-keyfile`: a second endpoint on this host answers HTTPS only, and the management CLI
    reaches it with the certificate in $SSL_CERT_FILE. Each server keeps its own metrics: BentoML gave every server
    on a host one Prometheus folder and emptied it at each start, so this server's start wiped the first one's counts
    (and `lantern endpoint show` then reported 0 requests to the rollout gates)."""
    import ssl

    from support.servers import self_signed_certificate

    assert predict(server, key).status_code == 200
    before = server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200")
    assert before >= 1
    cert, tls_key = self_signed_certificate(tmp_path / "tls")
    env = {**server.env, "LANTERN_API_KEY": "scoring-key", "LANTERN_ADMIN_KEY": "admin-key"}
    blue = {"name": "blue", "model": "models:/mc/1", "readiness_probe": {"initial_delay": 0, "period": 0.5}}
    other = Server({"name": "shop", "deployments": [blue], "traffic": {"blue": 100}}, tmp_path, env,
                   options=("--ssl-certfile", str(cert), "--ssl-keyfile", str(tls_key)),
                   tls=ssl.create_default_context(cafile=str(cert)))
    other.start()
    try:
        assert f"Endpoint shop on {other.url}: POST {other.url}/score" in " ".join(other.log().split())
        assert other.url.startswith("https://")
        answer = httpx.post(f"{other.url}/predict", content=png_bytes(), verify=other.verify, timeout=60,
                            headers={"Authorization": "Bearer scoring-key", "Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["deployment"] == "blue", answer.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the port: no answer
            httpx.get(other.url.replace("https://", "http://") + "/readyz", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
            httpx.get(f"{other.url}/readyz", timeout=10)
        shown = subprocess.run([lantern_executable(), "endpoint", "show", "--json"], capture_output=True, text=True,
                               timeout=60, env={**env, "LANTERN_URL": other.url, "SSL_CERT_FILE": str(cert)})
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        assert view["traffic"] == {"blue": 100}
        assert view["deployments"][0]["counters"]["requests"] == 1  # its own request, not the first server's
        assert other.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == 1
        assert server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == before
    finally:
        other.stop()
    assert predict(server, key).status_code == 200  # the second server's end leaves the first one's folder alone
    assert server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == before + 1
