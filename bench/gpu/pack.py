"""Pack what a GPU machine lacks to run Lantern's GPU tests and benchmarks, in parts small enough to carry.

The device machine (see bench/gpu/README.md) has Python 3.12, torch on CUDA and a CPU-only onnxruntime, but no
mlflow, bentoml, captum or pydantic, and it cannot reach a package index. This resolves Lantern's dependencies (and
its test extras) for CPython 3.12 on x86-64 Linux, leaves out what the device already has (`device_packages.txt`),
installs the rest with `pip install --target` into one folder here, and writes it as an xz-compressed tar split into
parts of at most `--part-mib` MiB, each in a folder of its own beside the manifest of all parts' sizes and hashes:
`.gpu/partN/` (ignored by git), which one device call carries.
`bench/gpu/device.sh` reassembles and unpacks them there.

    .venv/bin/python bench/gpu/pack.py            # a few minutes: the resolve, ~300 MB of wheels, xz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_" + str(n) + "_x86_64" for n in (17, 24, 26, 27, 28, 31, 34)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
# The device's own CUDA build of torch (and what comes with it) is the one to use: never carry another.
NEVER_CARRIED = re.compile(r"^(torch|torchvision|triton|nvidia-.*)$")


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# Test tools the GPU run does not use (the fuzz, OpenAPI and import tests run on the CPU), nor their dependencies.
NOT_FOR_THE_GPU_RUN = {"schemathesis", "openapi-spec-validator", "import-linter"}


def lantern_requirements() -> list[str]:
    """pyproject's dependencies and test extras, less torch and torchvision (the device brings its own) and the test
    tools the GPU run does not use."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = [(req, normalized(re.split(r"[<>=!~;\[ ]", req, 1)[0])) for req in wanted]
    return [req for req, name in names if not NEVER_CARRIED.match(name) and name not in NOT_FOR_THE_GPU_RUN]


def device_packages() -> set[str]:
    """Names of the distributions the device image already holds (one per line; '#' starts a comment)."""
    lines = (Path(__file__).with_name("device_packages.txt").read_text().splitlines())
    return {normalized(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()}


def pip_target_options() -> list[str]:
    """pip's options that pick wheels for the device's interpreter and platform."""
    options = ["--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation", "cp",
               "--abi", "cp" + DEVICE_PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def resolve(requirements: list[str], scratch: Path) -> dict[str, str]:
    """The whole dependency closure for the device's Python: name -> version."""
    report = scratch / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                    "--report", str(report), "--target", str(scratch / "unused"), *pip_target_options(),
                    *requirements], check=True)
    return {normalized(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def install(pins: dict[str, str], site: Path) -> None:
    """Install exactly these versions, without their dependencies, into `site` as the device's Python would."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target",
                    str(site), *pip_target_options(), *(f"{name}=={version}" for name, version in pins.items())],
                   check=True)


def write_parts(site: Path, out: Path, part_bytes: int) -> list[dict]:
    """`site` as one .tar.xz cut into numbered parts of at most `part_bytes`; returns each part's name, size, sha256."""
    archive = out / "site.tar.xz"
    with lzma.open(archive, "wb", preset=6) as compressed, tarfile.open(fileobj=compressed, mode="w") as tar:
        tar.add(site, arcname="site")
    parts = []
    with archive.open("rb") as whole:
        while chunk := whole.read(part_bytes):
            name = f"part{len(parts)}"
            (out / name).mkdir()
            (out / name / name).write_bytes(chunk)
            parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    archive.unlink()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu", help="where the parts go (default .gpu/)")
    parser.add_argument("--part-mib", type=int, default=60, help="size of each part; a call carries 64 MiB at most")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        closure = resolve(lantern_requirements(), scratch)
        have = device_packages()
        pins = {name: version for name, version in sorted(closure.items())
                if name not in have and not NEVER_CARRIED.match(name)}
        print(f"{len(closure)} distributions in the closure, {len(pins)} missing on the device", flush=True)
        site = scratch / "site"
        install(pins, site)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        parts = write_parts(site, args.out, args.part_mib * 2**20)
    manifest = json.dumps({"python": DEVICE_PYTHON, "packages": pins, "parts": parts}, indent=1)
    for part in parts:
        (args.out / part["name"] / "manifest.json").write_text(manifest)
    total = sum(part["bytes"] for part in parts) / 2**20
    print(f"{len(parts)} parts, {total:.0f} MiB in all: " + ", ".join(
        str(args.out / part["name"]) for part in parts) + ", one per call (bench/gpu/README.md)")


if __name__ == "__main__":
    main()
