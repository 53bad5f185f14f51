"""fhir-kit-client, a JavaScript FHIR client DESIGN.md names, works against Waha unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

# Pinned with every transitive dependency (package-lock.json beside this file).
LOCK = Path(__file__).with_name("package-lock.json")
MANIFEST = Path(__file__).with_name("package.json")
SCRIPT = Path(__file__).with_name("fhir_kit_client.mjs")
# Installed once per lock, outside the source tree's tracked files.
NODE_DIR = Path(__file__).resolve().parents[2] / "var" / "node-clients"


@pytest.fixture(scope="session")
def fhir_kit_client() -> Path:
    """Install fhir-kit-client from the npm registry (test set-up) and return its folder."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are needed to run fhir-kit-client")
    version = subprocess.run(  # noqa: S603 - node, fixed arguments
        [node, "--version"], capture_output=True, text=True, check=True
    ).stdout
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"fhir-kit-client needs Node.js 20 or later (found {version.strip()})")
    marker = NODE_DIR / ".installed-lock"
    lock = LOCK.read_text()
    if not marker.exists() or marker.read_text() != lock:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(MANIFEST, NODE_DIR / MANIFEST.name)
        shutil.copy(LOCK, NODE_DIR / LOCK.name)
        install = subprocess.run(  # noqa: S603 - npm, fixed arguments
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if install.returncode != 0:
            pytest.fail(f"npm ci failed (exit {install.returncode}):\n{install.stderr[-4000:]}")
        marker.write_text(lock)
    # ESM resolves packages from the script's own folder upwards.
    shutil.copy(SCRIPT, NODE_DIR / SCRIPT.name)
    return NODE_DIR


def test_fhir_kit_client_reads_writes_patches_pages_and_searches_a_compartment(
    fhir_kit_client: Path,
    paging_server: str,
    committed: Engine,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    token = auth_headers("admin")["Authorization"].removeprefix("Bearer ")
    environment = {
        **os.environ,
        "WAHA_FHIR_BASE": f"{paging_server}/fhir",
        "WAHA_TOKEN": token,
        "WAHA_NATIONAL_ID": f"FKC-{uuid.uuid4().hex[:8]}",
    }
    node = shutil.which("node")
    assert node is not None
    run = subprocess.run(  # noqa: S603 - node and the test's own script
        [node, str(fhir_kit_client / SCRIPT.name)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["fhirVersion"] == "4.0.1"
    assert seen["tokenUrl"].endswith("/protocol/openid-connect/token")
    assert seen["readFamily"] == "El Idrissi"
    assert seen["updatedVersion"] == "2"
    assert seen["patchedGender"] == "other"
    assert seen["transactionStatuses"] == ["201 Created"] * 3
    assert seen["pagedObservations"] == 3
    assert seen["compartmentObservations"] == 3
    assert seen["historyVersions"] == ["3", "2", "1"]
    assert seen["readDeleted"] == 410
    assert seen["readMissing"] == [404, "OperationOutcome"]
