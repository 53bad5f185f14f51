"""Demo images: a dermatoscope photo, a fundus photo and a wound photo, made and loaded in-process.

The images are drawn with Pillow from seeded `random.Random` instances (no
network, no files), so the same seed gives the same bytes on every machine
with the same Pillow. They are stored as Binaries uploaded by unit-01 for the
first demo patient unit-01 saw (X-Security-Context), so they are visible
through `GET /fhir/Binary/<id>` and the preview routes.

The dev S3 server keeps nothing across restarts while PostgreSQL keeps the
rows, so loading is idempotent by content: an image whose bytes unit-01
already stored is not uploaded again; if its object is missing it is put back
under the row's own key, and its previews are made again.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter
from sqlalchemy.orm import Session

from bench.loader import bundle_unit
from bench.population import DEMO_SEED, demo_dataset
from fhir_api import service as fhir_service
from fhir_api.context import SYSTEM_CONTEXT, UNRESTRICTED_ACCESS
from fhir_api.writes import EntryRequest, WriteSettings
from hub.db import session_scope
from hub.settings import Settings
from imaging_store import media, repository
from imaging_store.derivatives import service as derivatives_service
from imaging_store.service import BinaryContent, Caller, binary_storage, record_upload

DEMO_UNIT = "unit-01"
WIDTH, HEIGHT = 1200, 900
JPEG_QUALITY = 88


@dataclass(frozen=True)
class DemoImage:
    """One generated demo photo."""

    name: str
    title: str
    content: bytes


def _noise(rng: random.Random, size: tuple[int, int], blur: float) -> Image.Image:
    # Image.effect_noise uses the C library's generator: not reproducible.
    grain = Image.frombytes("L", size, rng.randbytes(size[0] * size[1]))
    return grain.filter(ImageFilter.GaussianBlur(blur)) if blur else grain


def _blob(
    rng: random.Random, centre: tuple[float, float], radius: float, points: int, jitter: float
) -> list[tuple[float, float]]:
    """Return an irregular closed outline around `centre`."""
    outline = []
    phase = rng.uniform(0, math.tau)
    for index in range(points):
        angle = math.tau * index / points
        wobble = 1 + jitter * (0.6 * math.sin(3 * angle + phase) + 0.4 * rng.uniform(-1, 1))
        outline.append(
            (
                centre[0] + radius * wobble * math.cos(angle),
                centre[1] + radius * wobble * math.sin(angle),
            )
        )
    return outline


def _skin(rng: random.Random, tone: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGB", (WIDTH, HEIGHT), tone)
    mottling = _noise(rng, (WIDTH, HEIGHT), 6).point(lambda value: 96 + value // 4)
    shade = Image.new("RGB", (WIDTH, HEIGHT), tuple(max(0, channel - 40) for channel in tone))
    skin = Image.composite(base, shade, mottling)
    pores = _noise(rng, (WIDTH, HEIGHT), 0.8)
    return Image.blend(skin, Image.merge("RGB", (pores, pores, pores)), 0.05)


def dermatoscope_image(seed: int = DEMO_SEED) -> bytes:
    """Return a dermatoscope-like photo of a pigmented lesion, as JPEG."""
    rng = random.Random(f"{seed}:demo-image:dermatoscope")
    image = _skin(rng, (214, 168, 140))
    lesion = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(lesion)
    draw.polygon(_blob(rng, (600, 450), 230, 90, 0.18), fill=255)
    lesion = lesion.filter(ImageFilter.GaussianBlur(14))
    brown = Image.new("RGB", (WIDTH, HEIGHT), (110, 62, 38))
    image = Image.composite(brown, image, lesion)
    # A darker reticular network and a few globules inside the lesion.
    network = Image.new("L", (WIDTH, HEIGHT), 0)
    net = ImageDraw.Draw(network)
    for _ in range(900):
        x, y = rng.gauss(600, 120), rng.gauss(450, 110)
        size = rng.uniform(3, 9)
        net.ellipse((x - size, y - size, x + size, y + size), outline=200, width=2)
    for _ in range(14):
        x, y = rng.gauss(620, 70), rng.gauss(440, 60)
        size = rng.uniform(6, 14)
        net.ellipse((x - size, y - size, x + size, y + size), fill=255)
    network = Image.composite(network, Image.new("L", (WIDTH, HEIGHT), 0), lesion)
    image = Image.composite(
        Image.new("RGB", (WIDTH, HEIGHT), (58, 30, 20)),
        image,
        network.filter(ImageFilter.GaussianBlur(1.5)),
    )
    # Hairs crossing the field.
    hairs = ImageDraw.Draw(image)
    for _ in range(9):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        angle = rng.uniform(0, math.tau)
        points = []
        for _step in range(40):
            points.append((x, y))
            angle += rng.uniform(-0.08, 0.08)
            x, y = x + 18 * math.cos(angle), y + 18 * math.sin(angle)
        hairs.line(points, fill=(45, 32, 26), width=3)
    # The dermatoscope's round field of view.
    field = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(field).ellipse((150, 0, 1050, 900), fill=255)
    image = Image.composite(
        image,
        Image.new("RGB", (WIDTH, HEIGHT), (8, 8, 8)),
        field.filter(ImageFilter.GaussianBlur(6)),
    )
    return _jpeg(image)


def fundus_image(seed: int = DEMO_SEED) -> bytes:
    """Return a fundus-like photo of a retina (optic disc, macula, vessels), as JPEG."""
    rng = random.Random(f"{seed}:demo-image:fundus")
    image = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    retina = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(retina)
    centre = (600, 450)
    for step in range(40, 0, -1):
        radius = 430 * step / 40
        shade = step / 40
        colour = (int(230 - 90 * shade), int(110 - 60 * shade), int(40 - 25 * shade))
        draw.ellipse(
            (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
            fill=colour,
        )
    retina = retina.filter(ImageFilter.GaussianBlur(20))
    texture = _noise(rng, (WIDTH, HEIGHT), 3)
    retina = Image.blend(
        retina,
        Image.merge(
            "RGB", (texture, texture.point(lambda v: v // 2), texture.point(lambda v: v // 6))
        ),
        0.08,
    )
    draw = ImageDraw.Draw(retina)
    disc = (820, 420)
    # Vessels: branching random walks leaving the optic disc.
    for branch in range(12):
        angle = math.tau * branch / 12 + rng.uniform(-0.2, 0.2)
        x, y = float(disc[0]), float(disc[1])
        width = rng.choice((7, 6, 5))
        colour = (120, 20, 18) if branch % 2 else (150, 35, 25)
        points = [(x, y)]
        for _step in range(60):
            angle += rng.uniform(-0.15, 0.15)
            x, y = x + 9 * math.cos(angle), y + 9 * math.sin(angle)
            points.append((x, y))
        draw.line(points, fill=colour, width=width, joint="curve")
    draw.ellipse((disc[0] - 70, disc[1] - 75, disc[0] + 70, disc[1] + 75), fill=(250, 220, 150))
    draw.ellipse((disc[0] - 30, disc[1] - 32, disc[0] + 30, disc[1] + 32), fill=(255, 245, 210))
    draw.ellipse((420, 400, 520, 500), fill=(120, 50, 20))
    retina = retina.filter(ImageFilter.GaussianBlur(2))
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).ellipse((170, 20, 1030, 880), fill=255)
    image = Image.composite(retina, image, mask.filter(ImageFilter.GaussianBlur(3)))
    return _jpeg(image)


def wound_image(seed: int = DEMO_SEED) -> bytes:
    """Return a photo-like view of a leg ulcer with a measuring scale, as JPEG."""
    rng = random.Random(f"{seed}:demo-image:wound")
    image = _skin(rng, (190, 140, 110))
    margin = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(margin).polygon(_blob(rng, (600, 420), 260, 80, 0.15), fill=255)
    image = Image.composite(
        Image.new("RGB", (WIDTH, HEIGHT), (205, 120, 115)),
        image,
        margin.filter(ImageFilter.GaussianBlur(18)),
    )
    bed = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(bed).polygon(_blob(rng, (600, 420), 200, 80, 0.2), fill=255)
    granulation = _noise(rng, (WIDTH, HEIGHT), 2.5)
    red = Image.merge(
        "RGB",
        (
            granulation.point(lambda v: 150 + v // 3),
            granulation.point(lambda v: 25 + v // 8),
            granulation.point(lambda v: 30 + v // 8),
        ),
    )
    image = Image.composite(red, image, bed.filter(ImageFilter.GaussianBlur(5)))
    slough = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(slough)
    for _ in range(6):
        draw.polygon(
            _blob(rng, (rng.gauss(600, 70), rng.gauss(420, 60)), rng.uniform(25, 55), 30, 0.3),
            fill=255,
        )
    slough = Image.composite(slough, Image.new("L", (WIDTH, HEIGHT), 0), bed)
    image = Image.composite(
        Image.new("RGB", (WIDTH, HEIGHT), (215, 190, 110)),
        image,
        slough.filter(ImageFilter.GaussianBlur(4)),
    )
    # A paper measuring scale in centimetres below the wound.
    ruler = ImageDraw.Draw(image)
    ruler.rectangle((250, 760, 950, 840), fill=(238, 236, 228), outline=(90, 90, 90), width=2)
    for tick in range(15):
        x = 270 + tick * 47
        ruler.line((x, 760, x, 800 if tick % 5 == 0 else 785), fill=(20, 20, 20), width=3)
    return _jpeg(image.filter(ImageFilter.GaussianBlur(0.6)))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def demo_images(seed: int = DEMO_SEED) -> list[DemoImage]:
    """Return the demo photos, the same bytes for the same seed."""
    return [
        DemoImage("dermatoscope", "Dermatoscopy of a pigmented lesion", dermatoscope_image(seed)),
        DemoImage("fundus", "Fundus photograph, right eye", fundus_image(seed)),
        DemoImage("wound", "Leg ulcer with measuring scale", wound_image(seed)),
    ]


def demo_patient_query(seed: int = DEMO_SEED) -> str:
    """Return the search that finds the first demo patient seen by unit-01."""
    _, bundles = demo_dataset(seed)
    for bundle in bundles:
        if bundle_unit(bundle) == DEMO_UNIT:
            return str(bundle["entry"][0]["request"]["ifNoneExist"])
    raise RuntimeError("the demo data set has no visit by unit-01")


def _demo_patient_id(settings: Settings, seed: int) -> str:
    with session_scope() as session:
        found = fhir_service.run_interaction(
            session,
            EntryRequest(method="GET", resource_type="Patient", query=demo_patient_query(seed)),
            context=SYSTEM_CONTEXT,
            settings=WriteSettings(base_url=settings.fhir_base_url),
        )
    entries = (found.search_bundle or {}).get("entry") or []
    if not entries:
        raise RuntimeError("the demo patient is not stored: load the demo data first")
    # Search entries embed stored JSON as is (not decoded): the id is in fullUrl.
    return str(entries[0]["fullUrl"]).rsplit("/", 1)[1]


def _media_for(session: Session, binary_id: str, caller: Caller, settings: Settings) -> None:
    """Record the Media that says what a demo photo is and whose record it belongs to."""
    media.record_media_for_binary(
        session,
        binary_id=binary_id,
        caller=caller,
        base_url=settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
    )


def load_demo_images(settings: Settings, *, seed: int = DEMO_SEED) -> dict[str, int]:
    """Store the demo photos as unit-01's Binaries of a demo patient; restore missing objects."""
    storage = binary_storage(settings)
    patient_id = _demo_patient_id(settings, seed)
    caller = Caller(
        client_id=DEMO_UNIT,
        author=f"Device/{DEMO_UNIT}",
        request_id="demo-images",
        access=UNRESTRICTED_ACCESS,
        unit=DEMO_UNIT,
    )
    counts = {"uploaded": 0, "restored": 0, "present": 0}
    for image in demo_images(seed):
        content = BinaryContent(limit=len(image.content))
        try:
            content.feed(image.content)
            with session_scope() as session:
                # The demo's own uploads: the same bytes sent by a benchmark are not it.
                rows = [
                    row
                    for row in repository.list_binary_objects_by_sha256(
                        session, owner_client_id=caller.owner, sha256=content.sha256
                    )
                    if row.security_context == f"Patient/{patient_id}"
                ]
                if not rows:
                    stored = record_upload(
                        session,
                        storage=storage,
                        content=content,
                        caller=caller,
                        base_url=settings.fhir_base_url,
                        enforce_referential_integrity=settings.enforce_referential_integrity,
                        security_context=f"Patient/{patient_id}",
                    )
                    _media_for(session, stored.id, caller, settings)
                    counts["uploaded"] += 1
                    continue
                for row in rows:
                    if not repository.list_binary_links(session, row.id):
                        _media_for(session, row.id, caller, settings)
                    if storage.exists(row.object_key):
                        counts["present"] += 1
                        continue
                    content.file.seek(0)
                    storage.put(
                        row.object_key,
                        content.file,
                        length=content.size,
                        content_type=row.content_type,
                    )
                    # The previews went with the store: make them again.
                    repository.delete_binary_derivative_rows(session, row.id)
                    derivatives_service.make_derivatives(
                        session,
                        storage=storage,
                        binary_id=row.id,
                        write_settings=WriteSettings(base_url=settings.fhir_base_url),
                    )
                    counts["restored"] += 1
        finally:
            content.close()
    return counts
