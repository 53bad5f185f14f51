"""Measure image uploads against the live API: throughput, memory and thumbnail latency.

1. Upload throughput of 1 MB and 10 MB images with N clients (default 4),
   through `POST /fhir/Binary`, through tus (`/imaging/uploads`, tuspy:
   a creation, then a PATCH) and through tus creation-with-upload (the file
   in the creating POST, as tus-js-client sends it), next to a raw S3 PUT
   of the same sizes to the same S3 server in the same run: the API should
   reach ≥ 80 % of the raw rate. A few untimed uploads per path come first
   (`--warmup`), so a just-started API is measured warm. The CPU each
   process group (API, S3 server, PostgreSQL, worker) used per upload is
   printed too: steadier than rates on a machine shared with the clients.
2. API memory during one 200 MB tus upload: the resident set (VmRSS) of every
   API process is sampled; it should stay flat (growth < 64 MB).
3. Thumbnail latency: a real photo is uploaded and its thumbnail polled until
   the worker has made it.

Every upload makes the Celery worker fetch the object and try previews (the
bench's images are JPEG-headed noise, so they fail fast), and on a small
machine that work competes with the uploads for the same CPUs. In production
derivatives run on worker machines; here the worker's CPU priority (nice) is
printed, `--worker-nice N` lowers it for the throughput runs (and restores it
after), and the time the derivative backlog took to drain after the last
burst is printed, before the thumbnail latency is measured on an idle queue.
The worker is never stopped or hidden: its work is only scheduled later.

    python -m bench.imaging --s3-endpoint 127.0.0.1:9000 [--api-pid PID ...] [--worker-nice 10]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from minio import Minio
from tusclient import client as tus_client

from bench.common import (
    BenchError,
    Check,
    IssuerToken,
    add_http_arguments,
    check_api,
    credentials,
    percentile,
    print_checks,
)
from bench.demo_images import dermatoscope_image

MB = 1024 * 1024
TARGET_RAW_FRACTION = 0.80
TARGET_RSS_GROWTH_BYTES = 64 * MB
TARGET_THUMBNAIL_SECONDS = 5.0
# Past this a thumbnail counts as never made (no worker, or a worker on another store).
THUMBNAIL_WAIT_SECONDS = 30.0
# tus PATCH size: one S3 part per request above the 5 MiB part minimum.
TUS_CHUNK_BYTES = 8 * MB
# The minio SDK refuses a part size under S3's minimum (5 MiB).
RAW_MIN_PART_BYTES = 5 * MB
# Past this the derivative backlog counts as not drained (no worker running).
BACKLOG_WAIT_SECONDS = 300.0
JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


@dataclass
class Throughput:
    """What one upload path did for one size."""

    path: str
    size: int
    uploads: int = 0
    failures: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    # The Binary of the upload that finished last (its derivatives come last).
    last_binary: str | None = None
    # CPU seconds each process group used during the run (see cpu_snapshot).
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def megabytes_per_second(self) -> float:
        """Return uploaded MB per wall-clock second."""
        return self.uploads * self.size / MB / self.elapsed if self.elapsed else 0.0


def image_payload(size: int, seed: int) -> bytes:
    """Return `size` bytes that sniff as JPEG (a JFIF header, random body, end marker)."""
    body = os.urandom(size - len(JPEG_START) - 2) if seed < 0 else _seeded(size, seed)
    return JPEG_START + body[: size - len(JPEG_START) - 2] + b"\xff\xd9"


def _seeded(size: int, seed: int) -> bytes:
    import random  # noqa: PLC0415 - only for the deterministic body

    return random.Random(seed).randbytes(size)


def _bearer(auth: str | IssuerToken | None) -> dict[str, str]:
    if auth is None:
        return {}
    token = auth.token() if isinstance(auth, IssuerToken) else auth
    return {"Authorization": f"Bearer {token}"}


def _run_clients(
    clients: int, uploads_per_client: int, upload: Callable[[int], None]
) -> tuple[float, int, list[str]]:
    failures: list[str] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        for index in range(uploads_per_client):
            try:
                upload(number * uploads_per_client + index)
            except Exception as error:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(f"{type(error).__name__}: {str(error)[:120]}")

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, len(failures), failures


def measure_post(
    base_url: str,
    auth: str | IssuerToken | None,
    payload: bytes,
    *,
    clients: int,
    count: int,
    timeout: float,
) -> Throughput:
    """Upload `payload` count times per client through POST /fhir/Binary."""
    headers = {**_bearer(auth), "Content-Type": "image/jpeg", "Prefer": "return=minimal"}
    local = threading.local()
    last: list[str] = []

    def upload(_: int) -> None:
        http = getattr(local, "client", None)
        if http is None:
            http = local.client = httpx.Client(base_url=base_url, timeout=timeout)
        response = http.post("/fhir/Binary", content=payload, headers=headers)
        if response.status_code != 201:
            raise BenchError(f"POST /fhir/Binary answered {response.status_code}")
        # Location: <base>/fhir/Binary/<id>/_history/<vid>
        last.append(response.headers["Location"].split("/Binary/")[1].split("/")[0])

    elapsed, failures, errors = _run_clients(clients, count, upload)
    return Throughput(
        "POST /fhir/Binary",
        len(payload),
        clients * count - failures,
        failures,
        elapsed,
        errors,
        last[-1] if last else None,
    )


def tus_upload(
    base_url: str, headers: dict[str, str], stream: io.IOBase | io.BufferedReader, size: int
) -> str:
    """Upload one stream through tus with tuspy; return the upload URL."""
    client = tus_client.TusClient(f"{base_url}/imaging/uploads", headers=headers)
    uploader = client.uploader(
        file_stream=stream,
        chunk_size=TUS_CHUNK_BYTES,
        metadata={"filename": f"bench-{uuid.uuid4()}.jpg", "filetype": "image/jpeg"},
        upload_checksum=False,
    )
    uploader.upload()
    if uploader.offset != size:
        raise BenchError(f"tus stopped at {uploader.offset} of {size} bytes")
    return str(uploader.url)


def measure_tus(
    base_url: str, auth: str | IssuerToken | None, payload: bytes, *, clients: int, count: int
) -> Throughput:
    """Upload `payload` count times per client through tus."""
    headers = _bearer(auth)
    last: list[str] = []

    def upload(_: int) -> None:
        last.append(tus_upload(base_url, headers, io.BytesIO(payload), len(payload)))

    elapsed, failures, errors = _run_clients(clients, count, upload)
    last_binary = None
    if last:
        # A finished upload names its Binary on HEAD (outside the timed run).
        answer = httpx.head(last[-1], headers={**headers, "Tus-Resumable": "1.0.0"})
        last_binary = answer.headers.get("Waha-Binary", "").removeprefix("Binary/") or None
    return Throughput(
        "tus /imaging/uploads",
        len(payload),
        clients * count - failures,
        failures,
        elapsed,
        errors,
        last_binary,
    )


def measure_tus_creation_with_upload(
    base_url: str,
    auth: str | IssuerToken | None,
    payload: bytes,
    *,
    clients: int,
    count: int,
    timeout: float,
) -> Throughput:
    """Upload `payload` count times per client as tus creations that carry the whole file."""
    headers = {
        **_bearer(auth),
        "Tus-Resumable": "1.0.0",
        "Upload-Length": str(len(payload)),
        "Content-Type": "application/offset+octet-stream",
    }
    local = threading.local()
    last: list[str] = []

    def upload(_: int) -> None:
        http = getattr(local, "client", None)
        if http is None:
            http = local.client = httpx.Client(base_url=base_url, timeout=timeout)
        response = http.post("/imaging/uploads", content=payload, headers=headers)
        if response.status_code != 201 or "Waha-Binary" not in response.headers:
            raise BenchError(f"tus creation-with-upload answered {response.status_code}")
        last.append(response.headers["Waha-Binary"].removeprefix("Binary/"))

    elapsed, failures, errors = _run_clients(clients, count, upload)
    return Throughput(
        "tus creation-with-upload",
        len(payload),
        clients * count - failures,
        failures,
        elapsed,
        errors,
        last[-1] if last else None,
    )


def measure_raw_s3(
    s3: Minio, bucket: str, payload: bytes, *, clients: int, count: int
) -> Throughput:
    """PUT `payload` count times per client straight to the S3 server."""

    def upload(number: int) -> None:
        s3.put_object(
            bucket,
            f"bench/{number}-{uuid.uuid4()}",
            io.BytesIO(payload),
            len(payload),
            content_type="image/jpeg",
            # One PUT, as the API stores a body of this size: left to itself the
            # SDK splits anything past 5 MiB into a multipart upload, a slower
            # baseline than the API's path.
            part_size=max(len(payload), RAW_MIN_PART_BYTES),
        )

    elapsed, failures, errors = _run_clients(clients, count, upload)
    return Throughput(
        "raw S3 PUT", len(payload), clients * count - failures, failures, elapsed, errors
    )


def process_groups(api: Sequence[int]) -> dict[str, list[int]]:
    """Return the processes on this machine of the API, the S3 server, PostgreSQL and the worker."""
    groups: dict[str, list[int]] = {
        "API": list(api),
        "S3": [],
        "PostgreSQL": [],
        "worker": celery_worker_pids(),
    }
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if name == "postgres":
            groups["PostgreSQL"].append(int(entry.name))
        elif b"moto_server" in command or name == "minio":
            groups["S3"].append(int(entry.name))
    return groups


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[tuple[str, int], float]:
    """Return the CPU seconds (user + system) each live process of the groups has used."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for group, pids in groups.items():
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used[(group, pid)] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def cpu_used(
    before: dict[tuple[str, int], float], after: dict[tuple[str, int], float]
) -> dict[str, float]:
    """Return CPU seconds per group between two snapshots (processes alive in both)."""
    used: dict[str, float] = {}
    for (group, pid), seconds in after.items():
        if (group, pid) in before:
            used[group] = used.get(group, 0.0) + seconds - before[(group, pid)]
    return used


def api_pids(given: Sequence[int]) -> list[int]:
    """Return the API's processes: the given pids, else every `hub.app:create_app` process found."""
    if given:
        return list(given)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\x00", b" ")
        except OSError:
            continue
        if b"hub.app:create_app" in command or (
            b"multiprocessing" in command and _parent_is_api(entry)
        ):
            found.append(int(entry.name))
    return found


def _parent_is_api(entry: Path) -> bool:
    try:
        status = (entry / "status").read_text()
        parent = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        return b"hub.app:create_app" in Path(f"/proc/{parent}/cmdline").read_bytes()
    except (OSError, StopIteration):
        return False


def celery_worker_pids() -> list[int]:
    """Return the processes of Celery workers running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\x00")
        except OSError:
            continue
        if any(part.endswith(b"celery") for part in command) and b"worker" in command:
            found.append(int(entry.name))
    return sorted(found)


def nice_of(pid: int) -> int | None:
    """Return a process's nice value, None if it is gone."""
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def set_nice(pids: Sequence[int], nice: int) -> dict[int, int]:
    """Set the nice value of processes; return their previous values (those that changed)."""
    previous = {}
    for pid in pids:
        before = nice_of(pid)
        if before is None:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as error:
            print(f"  could not renice Celery worker {pid}: {error}")
            continue
        previous[pid] = before
    return previous


def restore_nice(previous: dict[int, int]) -> None:
    """Put processes back to their nice values; say so if that is not allowed."""
    for pid, nice in previous.items():
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as error:
            print(f"  Celery worker {pid} stays at nice {nice_of(pid)}: {error}")


def wait_for_derivatives(
    base_url: str, auth: str | IssuerToken | None, binary_ids: Sequence[str], *, timeout: float
) -> float | None:
    """Poll the thumbnails of Binaries until the worker has handled each; return the seconds.

    Handled means made, or refused as undecodable (the bench's noise images):
    anything but 202. None when they were not all handled within the wait.
    """
    started = time.perf_counter()
    pending = list(binary_ids)
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        while pending:
            answer = http.get(f"/imaging/binaries/{pending[0]}/thumbnail", headers=_bearer(auth))
            if answer.status_code != 202:
                pending.pop(0)
                continue
            if time.perf_counter() - started > BACKLOG_WAIT_SECONDS:
                return None
            time.sleep(0.1)
    return time.perf_counter() - started


def rss_bytes(pid: int) -> int:
    """Return a process's resident set (VmRSS) in bytes, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def measure_big_tus(
    base_url: str, auth: str | IssuerToken | None, *, megabytes: int, pids: Sequence[int]
) -> tuple[float, int, int]:
    """Upload one large file by tus, sampling API RSS; return (seconds, baseline, growth)."""
    with tempfile.TemporaryFile() as spool:
        block = os.urandom(MB)
        spool.write(JPEG_START)
        for _ in range(megabytes):
            spool.write(block)
        size = spool.tell()
        spool.seek(0)
        baseline = {pid: rss_bytes(pid) for pid in pids}
        peak = dict(baseline)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for pid in pids:
                    peak[pid] = max(peak[pid], rss_bytes(pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        try:
            tus_upload(base_url, _bearer(auth), spool, size)
        finally:
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
    growth = max((peak[pid] - baseline[pid] for pid in pids), default=0)
    return elapsed, sum(baseline.values()), growth


def measure_thumbnails(
    base_url: str, auth: str | IssuerToken | None, *, samples: int, timeout: float
) -> list[float]:
    """Upload a real photo `samples` times; return seconds from upload to a ready thumbnail."""
    photo = dermatoscope_image()
    latencies = []
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        for _ in range(samples):
            started = time.perf_counter()
            created = http.post(
                "/fhir/Binary",
                content=photo,
                headers={**_bearer(auth), "Content-Type": "image/jpeg"},
            )
            if created.status_code != 201:
                raise BenchError(f"POST /fhir/Binary answered {created.status_code}")
            binary_id = created.json()["id"]
            deadline = started + THUMBNAIL_WAIT_SECONDS
            while True:
                answer = http.get(f"/imaging/binaries/{binary_id}/thumbnail", headers=_bearer(auth))
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    break
                if answer.status_code != 202 or time.perf_counter() > deadline:
                    raise BenchError(
                        f"thumbnail of Binary/{binary_id} answered {answer.status_code}; "
                        "is a worker on the same store running?"
                    )
                time.sleep(0.05)
    return latencies


def measure_throughput(
    base_url: str, auth: str | IssuerToken | None, s3: Minio, args: argparse.Namespace
) -> list[tuple[str, Throughput, list[Throughput]]]:
    """Run raw S3 and each API path's uploads per size; return (label, raw, paths) per size."""
    if args.warmup:
        # Not timed: the first requests to a fresh API process pay for its
        # connection pools, token keys and statement caches, which ten uploads
        # per client cannot amortize; the figures are of a running service.
        payload = image_payload(MB, seed=-1)
        measure_raw_s3(s3, args.raw_bucket, payload, clients=args.clients, count=args.warmup)
        measure_post(
            base_url, auth, payload, clients=args.clients, count=args.warmup, timeout=args.timeout
        )
        measure_tus(base_url, auth, payload, clients=args.clients, count=args.warmup)
        measure_tus_creation_with_upload(
            base_url, auth, payload, clients=args.clients, count=args.warmup, timeout=args.timeout
        )
    groups = process_groups(api_pids(args.api_pid))

    def accounted(measure: Callable[[], Throughput]) -> Throughput:
        before = cpu_snapshot(groups)
        run = measure()
        run.cpu = cpu_used(before, cpu_snapshot(groups))
        return run

    runs = []
    for size, count in ((MB, args.uploads_1mb), (10 * MB, args.uploads_10mb)):
        payload = image_payload(size, seed=size)
        raw = accounted(
            partial(measure_raw_s3, s3, args.raw_bucket, payload, clients=args.clients, count=count)
        )
        post = accounted(
            partial(
                measure_post,
                base_url,
                auth,
                payload,
                clients=args.clients,
                count=count,
                timeout=args.timeout,
            )
        )
        tus = accounted(
            partial(measure_tus, base_url, auth, payload, clients=args.clients, count=count)
        )
        with_upload = accounted(
            partial(
                measure_tus_creation_with_upload,
                base_url,
                auth,
                payload,
                clients=args.clients,
                count=count,
                timeout=args.timeout,
            )
        )
        runs.append((f"{size // MB} MB", raw, [post, tus, with_upload]))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the imaging benchmark and print figures against targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_http_arguments(parser)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--uploads-1mb", type=int, default=10, help="1 MB uploads per client and path"
    )
    parser.add_argument(
        "--uploads-10mb", type=int, default=2, help="10 MB uploads per client and path"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed 1 MB uploads per client and path before the throughput runs",
    )
    parser.add_argument(
        "--big-mb", type=int, default=200, help="size of the memory-check tus upload"
    )
    parser.add_argument("--thumbnails", type=int, default=5)
    parser.add_argument("--s3-endpoint", default="127.0.0.1:9000")
    parser.add_argument("--s3-access-key", default="waha")
    parser.add_argument("--s3-secret-key", default="waha-dev")
    parser.add_argument("--s3-region", default="us-east-1")
    parser.add_argument("--raw-bucket", default="waha-bench-raw")
    parser.add_argument(
        "--api-pid", type=int, action="append", default=[], help="API process id(s)"
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=None,
        help="nice value for the Celery worker processes during the throughput runs "
        "(restored after); default: leave them as they are",
    )
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    auth = credentials(args)
    try:
        check_api(base_url, token=auth)
        s3 = Minio(
            args.s3_endpoint,
            access_key=args.s3_access_key,
            secret_key=args.s3_secret_key,
            secure=False,
            region=args.s3_region,
        )
        if not s3.bucket_exists(args.raw_bucket):
            s3.make_bucket(args.raw_bucket)
        checks: list[Check] = []
        workers = celery_worker_pids()
        niced = set_nice(workers, args.worker_nice) if args.worker_nice is not None else {}
        nices = sorted({nice for nice in map(nice_of, workers) if nice is not None})
        print(
            f"Celery worker on this machine: {len(workers)} processes at nice "
            f"{'/'.join(map(str, nices)) or '-'}"
            + (f" (set by --worker-nice, was {sorted(set(niced.values()))})" if niced else "")
            + ("; none found: derivatives wait for a worker" if not workers else "")
        )
        last_binaries: list[str] = []
        try:
            runs = measure_throughput(base_url, auth, s3, args)
        finally:
            restore_nice(niced)
        for size_label, raw, paths in runs:
            print(
                f"{size_label}: "
                + ", ".join(
                    f"{run.path} {run.megabytes_per_second:.1f} MB/s" for run in (raw, *paths)
                )
            )
            for run in (raw, *paths):
                if run.uploads:
                    # The worker's share is what it did during the run; the
                    # derivatives of the last uploads come after it.
                    print(
                        f"  {run.path}: CPU ms per upload "
                        + ", ".join(
                            f"{group} {1000 * seconds / run.uploads:.1f}"
                            for group, seconds in sorted(run.cpu.items())
                        )
                    )
                for error in run.errors[:3]:
                    print(f"  {run.path} failure: {error}")
            for run in paths:
                if run.last_binary is not None:
                    last_binaries.append(run.last_binary)
                fraction = (
                    run.megabytes_per_second / raw.megabytes_per_second
                    if raw.megabytes_per_second
                    else 0.0
                )
                checks.append(
                    Check(
                        f"{run.path} {size_label} × {args.clients} vs raw S3",
                        f"{run.megabytes_per_second:.1f} MB/s = {fraction:.0%}",
                        f"≥ {TARGET_RAW_FRACTION:.0%} of raw "
                        f"({raw.megabytes_per_second:.1f} MB/s), 0 failed",
                        fraction >= TARGET_RAW_FRACTION and run.failures == 0,
                    )
                )
        drained = wait_for_derivatives(base_url, auth, last_binaries, timeout=args.timeout)
        print(
            "derivative backlog after the last burst: "
            + (f"drained in {drained:.1f} s" if drained is not None else "NOT drained")
        )
        pids = api_pids(args.api_pid)
        if pids:
            elapsed, baseline, growth = measure_big_tus(
                base_url, auth, megabytes=args.big_mb, pids=pids
            )
            checks.append(
                Check(
                    f"API RSS growth during a {args.big_mb} MB tus upload",
                    f"{growth / MB:.1f} MB (of {baseline / MB:.0f} MB, "
                    f"{args.big_mb / elapsed:.0f} MB/s)",
                    f"< {TARGET_RSS_GROWTH_BYTES // MB} MB",
                    growth < TARGET_RSS_GROWTH_BYTES,
                )
            )
        else:
            print("no API process found on this machine: pass --api-pid to measure memory")
        try:
            latencies = measure_thumbnails(
                base_url, auth, samples=args.thumbnails, timeout=args.timeout
            )
        except BenchError as error:
            print(f"thumbnails: {error}")
            latencies = []
        checks.append(
            Check(
                "thumbnail ready after upload (p50 / max)",
                f"{percentile(latencies, 0.5):.2f} / {max(latencies, default=float('nan')):.2f} s",
                f"max ≤ {TARGET_THUMBNAIL_SECONDS:.0f} s",
                bool(latencies) and max(latencies) <= TARGET_THUMBNAIL_SECONDS,
            )
        )
    except BenchError as error:
        print(f"bench.imaging: {error}")
        return 2
    print_checks("Imaging uploads", checks)
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
