"""Starting the real Lantern server (`lantern serve`) on a free loopback port for end-to-end tests."""

from __future__ import annotations

import gc
import io
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from PIL import Image, ImageDraw

from support.common import lantern_executable


@contextmanager
def in_process_client(endpoint) -> Iterator:
    """A TestClient on the HTTP app serving `endpoint` (a real serving.runtime.endpoint.Endpoint) in-process, once every
    deployment is ready; the endpoint is stopped after. Use one client for the endpoint's life: its batchers belong to
    the client's event loop."""
    from starlette.testclient import TestClient

    from serving.http.app import build_app

    app = build_app()
    app.state.endpoint = endpoint
    try:
        endpoint.start()
        deadline = time.monotonic() + 60
        while not endpoint.is_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert endpoint.is_ready(), endpoint.status()
        with TestClient(app) as client:
            yield client
    finally:
        endpoint.stop()
        gc.unfreeze()  # the worker freezes what it loaded out of full collections


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(size: int = 48, shape: str = "circle", color: tuple[int, int, int] = (220, 40, 40)) -> bytes:
    """A small RGB PNG of one filled shape on a grey background."""
    image = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def multipart_body(files: list, data: dict | None = None) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart form as httpx encodes it, as a client sends it (with at least one file:
    else httpx urlencodes the form)."""
    request = httpx.Request("POST", "http://lantern.test/predict", files=files, data=data)
    return request.headers["content-type"], request.read()


class Server:
    """`lantern serve CONFIG` in its own process group; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, config: dict, folder: Path, env: dict[str, str], workers: int = 1,
                 options: tuple[str, ...] = (), tls: ssl.SSLContext | None = None) -> None:
        self.folder = folder
        self.deployments = tuple(d["name"] for d in config.get("deployments", ()))  # as configured at the start
        self.config_path = folder / "endpoint.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = tls or True  # how clients check the server's certificate
        self.log_path = folder / "server.log"
        self.env = env
        self.workers = workers
        self.options = options  # more `lantern serve` options
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 180) -> "Server":
        """Launch the server and wait until `/readyz` answers 200."""
        return self.launch().wait_until_ready(ready_timeout)

    def launch(self) -> "Server":
        """Start `lantern serve` without waiting for it (servers started together load at the same time)."""
        log = self.log_path.open("ab")  # a restart keeps the earlier log
        elsewhere = self.folder / "elsewhere"  # the configuration is found by its path, not in the working directory
        elsewhere.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [lantern_executable(), "serve", str(self.config_path), "--port", str(self.port),
             "--workers", str(self.workers), *self.options],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=elsewhere,
        )
        return self

    def wait_until_ready(self, ready_timeout: float = 180) -> "Server":
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lantern serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {ready_timeout} s:\n{self.log()}")

    def wait_for_deployments(self, names: tuple[str, ...] | None = None, timeout: float = 120) -> None:
        """Wait until `/readyz` says each of `names` (default: every configured deployment) is ready: it answers 200
        once the deployments with traffic are, and the others may still load."""
        names = self.deployments if names is None else names
        deadline = time.monotonic() + timeout
        while True:
            states = httpx.get(f"{self.url}/readyz", timeout=5, verify=self.verify).json()["deployments"]
            if all(states.get(name) == "ready" for name in names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"deployments not ready within {timeout} s: {states}\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus sample over the series whose labels include `labels` (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10, verify=self.verify).text
        total = 0.0
        for line in text.splitlines():
            match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if not match:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
        return total


def self_signed_certificate(folder: Path, password: bytes | None = None) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a new self-signed certificate for 127.0.0.1 and localhost (the key encrypted
    with `password` when given)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                               x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


class SlowUpload:
    """A request whose body the client sends in two parts, with a pause of the test's choosing between them (a slow
    or stalled uploader), over a plain socket so that nothing buffers or times out on the client's side."""

    def __init__(self, url: str, path: str, body: bytes, headers: dict[str, str], sent_first: int,
                 method: str = "POST") -> None:
        from urllib.parse import urlsplit

        address = urlsplit(url)
        self.body, self.sent = body, sent_first
        self.socket = socket.create_connection((address.hostname, address.port), timeout=60)
        head = [f"{method} {path} HTTP/1.1", f"Host: {address.netloc}", f"Content-Length: {len(body)}",
                *(f"{name}: {value}" for name, value in headers.items())]
        self.socket.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[:sent_first])

    def abandon(self) -> None:
        """Hang up without sending the rest."""
        self.socket.close()

    def finish(self) -> httpx.Response:
        """Send the rest of the body and read the answer."""
        self.socket.sendall(self.body[self.sent:])
        return self.answer()

    def answer(self, timeout: float = 60) -> httpx.Response:
        """The server's answer (whole: the connection is closed after it), read within `timeout` seconds."""
        import http.client

        self.socket.settimeout(timeout)
        reply = http.client.HTTPResponse(self.socket)
        try:
            reply.begin()
            content = reply.read()
        finally:
            self.socket.close()
        return httpx.Response(reply.status, headers=reply.getheaders(), content=content)
