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

# Pinned: the version whose behaviour this test was written against.
FHIR_KIT_CLIENT = "fhir-kit-client@2.0.3"
SCRIPT = Path(__file__).with_name("fhir_kit_client.mjs")
# Installed once per checkout, outside the source tree's tracked files.
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
    package = NODE_DIR / "node_modules" / "fhir-kit-client" / "package.json"
    if not package.exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(  # noqa: S603 - npm, fixed arguments
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(NODE_DIR),
                FHIR_KIT_CLIENT,
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
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
