"""Generate a deterministic synthetic mobile-unit population as FHIR R4 JSON.

Everything derives from a seed through `random.Random` instances keyed by strings
(`Random(f"{seed}:patient:{i}")`), never the global generator, so any patient, visit
or benchmark bundle can be rebuilt on its own and the same seed always gives
byte-identical JSON. The shapes follow DESIGN.md "Unit bundle profile" and
`shared/examples/unit-bundle.json`, without Media/Binary (images come later).

Tour stops are `Location/stop-<commune>-<YYYY-MM-DD>`: a unit spends one working day
at one commune, and the rotation is anchored so that unit-01 is at Sidi Bouzid on
2026-11-18, which is the stop the example bundle references.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

JSONObject = dict[str, Any]

SID_NATIONAL_ID = "https://waha.health/fhir/sid/national-id"
SID_UNIT_RECORD_PREFIX = "https://waha.health/fhir/sid/unit-record/"
SID_UNIT_BUNDLE = "https://waha.health/fhir/sid/unit-bundle"
SID_UNIT = "https://waha.health/fhir/sid/unit"
SID_REGION = "https://waha.health/fhir/sid/region"
SID_COMMUNE = "https://waha.health/fhir/sid/commune"
SID_TOUR_STOP = "https://waha.health/fhir/sid/tour-stop"
REQUEST_CATEGORY_SYSTEM = "https://waha.health/fhir/CodeSystem/request-category"

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
LOCATION_PHYSICAL_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
LANGUAGE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/language"

# Morocco keeps UTC+1 most of the year; the units stamp local time with the offset.
MOROCCO_TZ = timezone(timedelta(hours=1))

# unit-01 is at its first commune (Sidi Bouzid) on this day: the example bundle's stop.
ROTATION_ANCHOR = date(2026, 11, 18)

DEMO_SEED = 42
DEMO_START = date(2026, 9, 1)
DEMO_MONTHS = 3
DEMO_PATIENTS = 30
DEMO_VISITS_PER_PATIENT = 3
DEMO_UNITS = 2


@dataclass(frozen=True)
class Region:
    """A Moroccan region that runs mobile units."""

    slug: str
    name: str
    name_ar: str
    id_prefixes: tuple[str, ...]

    @property
    def organization_id(self) -> str:
        """Return the id of the regional health directorate Organization."""
        return f"region-{self.slug}"


@dataclass(frozen=True)
class Commune:
    """A rural commune the units tour."""

    slug: str
    name: str
    province: str
    region: str
    latitude: float
    longitude: float

    @property
    def location_id(self) -> str:
        """Return the id of the commune's area Location."""
        return f"commune-{self.slug}"


@dataclass(frozen=True)
class Unit:
    """A mobile medical unit (vehicle and crew) and the communes it tours."""

    number: int
    region: Region
    communes: tuple[Commune, ...]

    @property
    def id(self) -> str:
        """Return the unit id used by its Organization, Device and client."""
        return f"unit-{self.number:02d}"


@dataclass(frozen=True)
class TourStop:
    """One working day of one unit at one commune."""

    unit: Unit
    commune: Commune
    day: date

    @property
    def id(self) -> str:
        """Return the stop's Location id."""
        return f"stop-{self.commune.slug}-{self.day.isoformat()}"


@dataclass(frozen=True)
class PatientProfile:
    """The demographics of one synthetic person."""

    index: int
    national_id: str | None
    gender: str
    birth_date: str
    given: str
    given_ar: str
    family: str
    family_ar: str
    home: Commune
    home_unit: Unit
    douar: str
    phone: str | None
    registered_year: int
    population: str

    def record_number(self, unit: Unit) -> str:
        """Return the patient's record number at the given unit."""
        # The population tag keeps numbers of different seeds apart: two
        # populations loaded into one store must not share a record number, or
        # a conditional create on it would match people from both.
        return f"U{unit.number:02d}-{self.registered_year}-{self.population}-{self.index:06d}"


@dataclass(frozen=True)
class Visit:
    """One patient seen at one tour stop at a given time."""

    patient: PatientProfile
    stop: TourStop
    start: datetime


REGIONS: tuple[Region, ...] = (
    Region("marrakech-safi", "Marrakech-Safi", "مراكش آسفي", ("E", "EE", "EB", "H")),
    Region("oriental", "Oriental", "الشرق", ("F", "FA", "FB", "FH")),
    Region("draa-tafilalet", "Drâa-Tafilalet", "درعة تافيلالت", ("U", "UA", "UC")),
    Region("souss-massa", "Souss-Massa", "سوس ماسة", ("J", "JA", "JB", "JC")),
)
_REGION_BY_SLUG = {region.slug: region for region in REGIONS}

COMMUNES: tuple[Commune, ...] = (
    Commune("sidi-bouzid", "Sidi Bouzid", "Rehamna", "marrakech-safi", 32.0312, -7.9517),
    Commune("ait-ourir", "Aït Ourir", "Al Haouz", "marrakech-safi", 31.5634, -7.6622),
    Commune("tahannaout", "Tahannaout", "Al Haouz", "marrakech-safi", 31.3540, -7.9510),
    Commune("imintanoute", "Imintanoute", "Chichaoua", "marrakech-safi", 31.1760, -8.8510),
    Commune("sidi-rahal", "Sidi Rahal", "El Kelâa des Sraghna", "marrakech-safi", 31.6500, -7.4700),
    Commune("amizmiz", "Amizmiz", "Al Haouz", "marrakech-safi", 31.2170, -8.2400),
    Commune("tendrara", "Tendrara", "Figuig", "oriental", 33.0500, -2.0000),
    Commune("bouarfa", "Bouarfa", "Figuig", "oriental", 32.5300, -1.9600),
    Commune("debdou", "Debdou", "Taourirt", "oriental", 33.9800, -3.0500),
    Commune("ain-beni-mathar", "Aïn Beni Mathar", "Jerada", "oriental", 34.0100, -2.0300),
    Commune("touissit", "Touissit", "Jerada", "oriental", 34.4800, -1.7700),
    Commune("tafoughalt", "Tafoughalt", "Berkane", "oriental", 34.8100, -2.4100),
    Commune("alnif", "Alnif", "Tinghir", "draa-tafilalet", 31.1200, -5.1700),
    Commune("tazarine", "Tazarine", "Zagora", "draa-tafilalet", 30.7800, -5.5700),
    Commune("msemrir", "Msemrir", "Tinghir", "draa-tafilalet", 31.7000, -5.8200),
    Commune("agdz", "Agdz", "Zagora", "draa-tafilalet", 30.7000, -6.4500),
    Commune("rich", "Rich", "Midelt", "draa-tafilalet", 32.2600, -4.5000),
    Commune("imilchil", "Imilchil", "Midelt", "draa-tafilalet", 32.1600, -5.6300),
    Commune("tafraout", "Tafraout", "Tiznit", "souss-massa", 29.7200, -8.9700),
    Commune("igherm", "Igherm", "Taroudant", "souss-massa", 30.0900, -8.4600),
    Commune("akka", "Akka", "Tata", "souss-massa", 29.3900, -8.2500),
    Commune("tata", "Tata", "Tata", "souss-massa", 29.7400, -7.9700),
    Commune("aoulouz", "Aoulouz", "Taroudant", "souss-massa", 30.6700, -8.1500),
    Commune("anzi", "Anzi", "Tiznit", "souss-massa", 29.5800, -9.4000),
)

MAX_UNITS = len(COMMUNES)

_FEMALE_NAMES = (
    ("Khadija", "خديجة"),
    ("Fatima", "فاطمة"),
    ("Aicha", "عائشة"),
    ("Zineb", "زينب"),
    ("Meryem", "مريم"),
    ("Naima", "نعيمة"),
    ("Hafsa", "حفصة"),
    ("Samira", "سميرة"),
    ("Rachida", "رشيدة"),
    ("Latifa", "لطيفة"),
    ("Amina", "أمينة"),
    ("Souad", "سعاد"),
    ("Malika", "مليكة"),
    ("Itto", "إيطو"),
    ("Hanane", "حنان"),
    ("Zahra", "زهرة"),
)
_MALE_NAMES = (
    ("Mohamed", "محمد"),
    ("Ahmed", "أحمد"),
    ("Youssef", "يوسف"),
    ("Hassan", "حسن"),
    ("Brahim", "إبراهيم"),
    ("Omar", "عمر"),
    ("Abdellah", "عبد الله"),
    ("Mustapha", "مصطفى"),
    ("Rachid", "رشيد"),
    ("Said", "سعيد"),
    ("Lahcen", "لحسن"),
    ("Driss", "إدريس"),
    ("Khalid", "خالد"),
    ("Hamid", "حميد"),
    ("Mbark", "امبارك"),
    ("Ayoub", "أيوب"),
)
_FAMILY_NAMES = (
    ("El Idrissi", "الإدريسي"),
    ("Benali", "بنعلي"),
    ("El Amrani", "العمراني"),
    ("Ait Ouahmane", "آيت واحمان"),
    ("Bennani", "بناني"),
    ("Ouhaddou", "أوحدو"),
    ("Tazi", "التازي"),
    ("El Fassi", "الفاسي"),
    ("Alaoui", "العلوي"),
    ("Berrada", "برادة"),
    ("Zerouali", "الزروالي"),
    ("Ouchen", "أوشن"),
    ("Bouzidi", "البوزيدي"),
    ("El Khatib", "الخطيب"),
    ("Naciri", "الناصري"),
    ("Lahlou", "لحلو"),
    ("Ait Lahcen", "آيت لحسن"),
    ("Amzil", "أمزيل"),
)
_DOUARS = (
    "Ouled Ali",
    "Ait Hammou",
    "Tighza",
    "Ouled Said",
    "Ait Brahim",
    "Ighil",
    "Tizi n'Oucheg",
    "Ouled Moussa",
    "Agouim",
    "Anergui",
    "Ait Youl",
    "Lamhamid",
)


@dataclass(frozen=True)
class _VitalSign:
    code: str
    display: str
    unit: str
    ucum: str


_SYSTOLIC = _VitalSign("8480-6", "Systolic blood pressure", "mmHg", "mm[Hg]")
_DIASTOLIC = _VitalSign("8462-4", "Diastolic blood pressure", "mmHg", "mm[Hg]")
_HEART_RATE = _VitalSign("8867-4", "Heart rate", "/min", "/min")
_RESPIRATORY_RATE = _VitalSign("9279-1", "Respiratory rate", "/min", "/min")
_TEMPERATURE = _VitalSign("8310-5", "Body temperature", "Cel", "Cel")
_OXYGEN = _VitalSign("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", "%")
_WEIGHT = _VitalSign("29463-7", "Body weight", "kg", "kg")
_HEIGHT = _VitalSign("8302-2", "Body height", "cm", "cm")
_BMI = _VitalSign("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "kg/m2")
_GLUCOSE = _VitalSign("2339-0", "Glucose [Mass/volume] in Blood", "g/L", "g/L")

ALL_VITAL_SIGNS: tuple[_VitalSign, ...] = (
    _SYSTOLIC,
    _DIASTOLIC,
    _HEART_RATE,
    _RESPIRATORY_RATE,
    _TEMPERATURE,
    _OXYGEN,
    _WEIGHT,
    _HEIGHT,
    _BMI,
    _GLUCOSE,
)

SPECIALTIES: dict[str, str] = {
    "394582007": "Dermatology",
    "394579002": "Cardiology",
    "394594003": "Ophthalmology",
    "394583002": "Endocrinology",
}

# SNOMED CT disorder -> (display, specialty that reviews it, or None for no referral).
_CONDITIONS: tuple[tuple[str, str, str | None], ...] = (
    ("38341003", "Hypertensive disorder, systemic arterial", "394579002"),
    ("49436004", "Atrial fibrillation", "394579002"),
    ("84114007", "Heart failure", "394579002"),
    ("44054006", "Diabetes mellitus type 2", "394583002"),
    ("40930008", "Hypothyroidism", "394583002"),
    ("414916001", "Obesity", "394583002"),
    ("271807003", "Eruption of skin", "394582007"),
    ("43116000", "Eczema", "394582007"),
    ("4855003", "Retinopathy due to diabetes mellitus", "394594003"),
    ("23986001", "Glaucoma", "394594003"),
    ("195967001", "Asthma", None),
)

_PRIORITIES = ("routine", "urgent", "asap", "stat")
_PRIORITY_WEIGHTS = (70, 20, 8, 2)


def _rng(seed: int | str, *parts: object) -> random.Random:
    """Return a generator keyed by the seed and a path, independent of any other."""
    # str seeds are hashed with SHA-512 by random.seed (version 2): stable across runs.
    return random.Random(":".join([str(seed), *map(str, parts)]))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _workday_number(day: date) -> int:
    # date.fromordinal(1) is a Monday, so whole weeks are (ordinal - 1) // 7.
    return (day.toordinal() - 1) // 7 * 5 + min(day.weekday(), 4)


def _add_months(day: date, months: int) -> date:
    month_index = day.month - 1 + months
    return date(day.year + month_index // 12, month_index % 12 + 1, 1)


def make_units(count: int) -> list[Unit]:
    """Return `count` units: unit-01 in Marrakech-Safi, unit-02 in Oriental, then round-robin."""
    if not 1 <= count <= MAX_UNITS:
        raise ValueError(f"units must be between 1 and {MAX_UNITS}, got {count}")
    regions = [REGIONS[(number - 1) % len(REGIONS)] for number in range(1, count + 1)]
    units: list[Unit] = []
    for number, region in enumerate(regions, start=1):
        peers = [n for n, r in enumerate(regions, start=1) if r == region]
        rank = peers.index(number)
        region_communes = [c for c in COMMUNES if c.region == region.slug]
        # Units of one region split its communes, so no two units share a stop id.
        communes = tuple(region_communes[rank :: len(peers)])
        units.append(Unit(number=number, region=region, communes=communes))
    return units


def tour_stops(units: Sequence[Unit], start: date, end: date) -> list[TourStop]:
    """Return every unit's working-day stops in [start, end), by day then unit."""
    stops: list[TourStop] = []
    anchor = _workday_number(ROTATION_ANCHOR)
    day = start
    while day < end:
        if day.weekday() < 5:
            offset = _workday_number(day) - anchor
            for unit in units:
                stops.append(TourStop(unit, unit.communes[offset % len(unit.communes)], day))
        day += timedelta(days=1)
    return stops


@lru_cache(maxsize=8)
def _stops_cached(unit_count: int, start: date, months: int) -> tuple[TourStop, ...]:
    return tuple(tour_stops(make_units(unit_count), start, _add_months(start, months)))


def _national_id_offset(seed: int | str) -> int:
    return _rng(seed, "national-id").randrange(1_000_000)


def _population_tag(seed: int | str) -> str:
    return f"{_rng(seed, 'population').randrange(36**5):05X}"


def patient_profile(seed: int | str, index: int, *, units: Sequence[Unit]) -> PatientProfile:
    """Return the demographics of patient `index` of the population `seed`."""
    rng = _rng(seed, "patient", index)
    home = rng.choice([commune for unit in units for commune in unit.communes])
    home_unit = next(unit for unit in units if home in unit.communes)
    gender = rng.choice(("female", "male"))
    given, given_ar = rng.choice(_FEMALE_NAMES if gender == "female" else _MALE_NAMES)
    family, family_ar = rng.choice(_FAMILY_NAMES)
    # Mobile units see mostly children and older adults.
    age = int(min(95, max(0, rng.choice((rng.gauss(8, 5), rng.gauss(58, 15), rng.gauss(35, 12))))))
    birth = date(2026 - age, 1, 1) + timedelta(days=rng.randrange(365))
    # Older rural patients often only know their birth year (the example has "1958").
    birth_date = str(birth.year) if age > 50 and rng.random() < 0.4 else birth.isoformat()
    national_id: str | None = None
    if age >= 18 and rng.random() < 0.88:
        # The CNIE number is a bijection of the index (7919 is prime to 10^6): unique.
        number = (index * 7919 + _national_id_offset(seed)) % 1_000_000
        national_id = f"{rng.choice(home_unit.region.id_prefixes)}{number:06d}"
    phone = f"+2126{rng.randrange(10_000_000, 100_000_000)}" if rng.random() < 0.6 else None
    return PatientProfile(
        index=index,
        national_id=national_id,
        gender=gender,
        birth_date=birth_date,
        given=given,
        given_ar=given_ar,
        family=family,
        family_ar=family_ar,
        home=home,
        home_unit=home_unit,
        douar=rng.choice(_DOUARS),
        phone=phone,
        registered_year=rng.choice((2024, 2025, 2026)),
        population=_population_tag(seed),
    )


# ---------------------------------------------------------------------------
# Reference data (PUT with client-chosen ids)


def _region_organization(region: Region) -> JSONObject:
    return {
        "resourceType": "Organization",
        "id": region.organization_id,
        "identifier": [{"system": SID_REGION, "value": region.slug}],
        "active": True,
        "type": [{"coding": [{"system": ORGANIZATION_TYPE, "code": "govt"}]}],
        "name": f"Direction régionale de la santé {region.name}",
        "alias": [f"المديرية الجهوية للصحة {region.name_ar}"],
        "address": [{"state": region.name, "country": "MA"}],
    }


def _unit_organization(unit: Unit) -> JSONObject:
    return {
        "resourceType": "Organization",
        "id": unit.id,
        "identifier": [{"system": SID_UNIT, "value": unit.id}],
        "active": True,
        "type": [{"coding": [{"system": ORGANIZATION_TYPE, "code": "prov"}]}],
        "name": f"Unité médicale mobile {unit.number:02d} ({unit.region.name})",
        "partOf": {"reference": f"Organization/{unit.region.organization_id}"},
    }


def _unit_device(unit: Unit) -> JSONObject:
    return {
        "resourceType": "Device",
        "id": unit.id,
        "identifier": [{"system": SID_UNIT, "value": unit.id}],
        "status": "active",
        "deviceName": [{"name": f"Waha {unit.id} unit software", "type": "user-friendly-name"}],
        "owner": {"reference": f"Organization/{unit.id}"},
    }


def _address(commune: Commune) -> JSONObject:
    return {
        "use": "work",
        "type": "physical",
        "city": commune.name,
        "district": commune.province,
        "state": _REGION_BY_SLUG[commune.region].name,
        "country": "MA",
    }


def _commune_location(commune: Commune) -> JSONObject:
    return {
        "resourceType": "Location",
        "id": commune.location_id,
        "identifier": [{"system": SID_COMMUNE, "value": commune.slug}],
        "status": "active",
        "name": f"Commune {commune.name}",
        "mode": "kind",
        "physicalType": {
            "coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": "area", "display": "Area"}]
        },
        "address": _address(commune),
        "position": {"latitude": commune.latitude, "longitude": commune.longitude},
        "managingOrganization": {
            "reference": f"Organization/{_REGION_BY_SLUG[commune.region].organization_id}"
        },
    }


def _stop_location(seed: int | str, stop: TourStop) -> JSONObject:
    rng = _rng(seed, "stop", stop.id)
    return {
        "resourceType": "Location",
        "id": stop.id,
        "identifier": [{"system": SID_TOUR_STOP, "value": stop.id}],
        "status": "active",
        "name": f"Tour stop {stop.commune.name}",
        "description": f"{stop.unit.id} at {stop.commune.name} on {stop.day.isoformat()}",
        "mode": "instance",
        "physicalType": {
            "coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": "si", "display": "Site"}]
        },
        "address": _address(stop.commune),
        # The vehicle parks somewhere in the commune: a school yard, a souk square.
        "position": {
            "latitude": round(stop.commune.latitude + rng.uniform(-0.02, 0.02), 5),
            "longitude": round(stop.commune.longitude + rng.uniform(-0.02, 0.02), 5),
        },
        "managingOrganization": {"reference": f"Organization/{stop.unit.region.organization_id}"},
        "partOf": {"reference": f"Location/{stop.commune.location_id}"},
    }


def reference_resources(
    seed: int | str = DEMO_SEED,
    *,
    units: int = DEMO_UNITS,
    start: date = DEMO_START,
    months: int = DEMO_MONTHS,
) -> list[JSONObject]:
    """Return the PUT-able reference resources (orgs, devices, locations) in dependency order."""
    unit_list = make_units(units)
    regions = [region for region in REGIONS if any(unit.region == region for unit in unit_list)]
    communes = [commune for unit in unit_list for commune in unit.communes]
    resources: list[JSONObject] = [_region_organization(region) for region in regions]
    resources += [_unit_organization(unit) for unit in unit_list]
    resources += [_unit_device(unit) for unit in unit_list]
    resources += [_commune_location(commune) for commune in communes]
    resources += [_stop_location(seed, stop) for stop in _stops_cached(units, start, months)]
    return resources


# ---------------------------------------------------------------------------
# Visit bundles


def _patient_resource(profile: PatientProfile, unit: Unit) -> JSONObject:
    identifiers: list[JSONObject] = []
    if profile.national_id is not None:
        identifiers.append({"system": SID_NATIONAL_ID, "value": profile.national_id})
    identifiers.append(
        {"system": SID_UNIT_RECORD_PREFIX + unit.id, "value": profile.record_number(unit)}
    )
    patient: JSONObject = {
        "resourceType": "Patient",
        "identifier": identifiers,
        "name": [
            {"use": "official", "family": profile.family, "given": [profile.given]},
            {
                "use": "official",
                "family": profile.family_ar,
                "given": [profile.given_ar],
                "extension": [{"url": LANGUAGE_EXTENSION, "valueCode": "ar"}],
            },
        ],
        "gender": profile.gender,
        "birthDate": profile.birth_date,
        "address": [
            {
                "use": "home",
                "text": f"Douar {profile.douar}, Commune {profile.home.name}",
                "city": profile.home.name,
                "district": profile.home.province,
                "state": _REGION_BY_SLUG[profile.home.region].name,
                "country": "MA",
            }
        ],
    }
    if profile.phone is not None:
        patient["telecom"] = [{"system": "phone", "value": profile.phone, "use": "mobile"}]
    return patient


def _if_none_exist(profile: PatientProfile, unit: Unit) -> str:
    if profile.national_id is not None:
        return f"identifier={SID_NATIONAL_ID}|{profile.national_id}"
    return f"identifier={SID_UNIT_RECORD_PREFIX}{unit.id}|{profile.record_number(unit)}"


def _encounter(
    visit: Visit, *, patient_url: str, end: datetime, encounter_class: str
) -> JSONObject:
    unit = visit.stop.unit
    display = "field" if encounter_class == "FLD" else "ambulatory"
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": ACT_CODE, "code": encounter_class, "display": display},
        "type": [{"text": "Mobile unit consultation"}],
        "subject": {"reference": patient_url},
        "participant": [{"individual": {"display": f"Dr. {unit.id} physician"}}],
        "period": {"start": _instant(visit.start), "end": _instant(end)},
        "location": [
            {
                "location": {
                    "reference": f"Location/{visit.stop.id}",
                    "display": f"Tour stop {visit.stop.commune.name}",
                }
            }
        ],
        "serviceProvider": {"reference": f"Organization/{unit.id}"},
    }


def _vital_values(
    rng: random.Random, profile: PatientProfile, hypertensive: bool
) -> dict[str, float]:
    child = profile.birth_date[:4] >= "2010"
    height = rng.uniform(95, 160) if child else rng.uniform(150, 185)
    weight = rng.uniform(14, 50) if child else rng.uniform(48, 98)
    systolic = rng.randint(140, 185) if hypertensive else rng.randint(98, 138)
    return {
        _SYSTOLIC.code: systolic,
        _DIASTOLIC.code: rng.randint(int(systolic * 0.55), int(systolic * 0.68)),
        _HEART_RATE.code: rng.randint(58, 110 if child else 96),
        _RESPIRATORY_RATE.code: rng.randint(18, 30) if child else rng.randint(12, 20),
        _TEMPERATURE.code: round(rng.uniform(36.2, 38.6), 1),
        _OXYGEN.code: rng.randint(91, 100),
        _WEIGHT.code: round(weight, 1),
        _HEIGHT.code: round(height),
        _BMI.code: round(weight / (height / 100) ** 2, 1),
        _GLUCOSE.code: round(rng.uniform(0.75, 2.4 if hypertensive else 1.3), 2),
    }


def _observation(
    vital: _VitalSign, value: float, *, patient_url: str, encounter_url: str, taken: datetime
) -> JSONObject:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": vital.code, "display": vital.display}]},
        "subject": {"reference": patient_url},
        "encounter": {"reference": encounter_url},
        "effectiveDateTime": _instant(taken),
        "valueQuantity": {"value": value, "unit": vital.unit, "system": UCUM, "code": vital.ucum},
    }


def _condition(
    code: str, display: str, *, confirmed: bool, patient_url: str, encounter_url: str, day: date
) -> JSONObject:
    return {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
        "verificationStatus": {
            "coding": [
                {
                    "system": CONDITION_VERIFICATION,
                    "code": "confirmed" if confirmed else "provisional",
                }
            ]
        },
        "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis"}]}],
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        "subject": {"reference": patient_url},
        "encounter": {"reference": encounter_url},
        "recordedDate": day.isoformat(),
    }


def _service_request(
    specialty: str,
    reason: str,
    *,
    priority: str,
    unit: Unit,
    patient_url: str,
    encounter_url: str,
    condition_url: str,
    authored: datetime,
) -> JSONObject:
    name = SPECIALTIES[specialty]
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": REQUEST_CATEGORY_SYSTEM, "code": "tele-expertise"}]}],
        "code": {"text": f"{name} tele-expertise: {reason.lower()}"},
        "priority": priority,
        "performerType": {"coding": [{"system": SNOMED, "code": specialty, "display": name}]},
        "subject": {"reference": patient_url},
        "encounter": {"reference": encounter_url},
        "reasonReference": [{"reference": condition_url}],
        "authoredOn": _instant(authored),
        "requester": {"reference": f"Organization/{unit.id}"},
    }


def _entry(full_url: str, resource: JSONObject, *, if_none_exist: str | None = None) -> JSONObject:
    request: JSONObject = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist is not None:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _bundle(rng: random.Random, entries: list[JSONObject], timestamp: datetime) -> JSONObject:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": SID_UNIT_BUNDLE, "value": _uuid(rng)},
        "timestamp": _instant(timestamp),
        "entry": entries,
    }


def visit_bundle(seed: int | str, visit: Visit) -> JSONObject:
    """Return the transaction Bundle a unit sends for one visit."""
    rng = _rng(seed, "visit", visit.patient.index, visit.stop.id)
    unit = visit.stop.unit
    patient_url = f"urn:uuid:{_uuid(rng)}"
    encounter_url = f"urn:uuid:{_uuid(rng)}"
    end = visit.start + timedelta(minutes=rng.randint(12, 40))

    conditions: list[tuple[str, str, str | None]] = []
    roll = rng.random()
    if roll < 0.35:
        conditions = rng.sample(_CONDITIONS, 2 if roll < 0.08 else 1)
    hypertensive = any(code == "38341003" for code, _, _ in conditions)

    values = _vital_values(rng, visit.patient, hypertensive)
    vitals = [_SYSTOLIC, _DIASTOLIC, _HEART_RATE, _WEIGHT]
    vitals += [v for v in (_TEMPERATURE, _OXYGEN, _RESPIRATORY_RATE) if rng.random() < 0.5]
    if rng.random() < 0.4:
        vitals += [_HEIGHT, _BMI]
    if rng.random() < 0.3:
        vitals.append(_GLUCOSE)
    taken = visit.start + timedelta(minutes=rng.randint(3, 10))

    entries = [
        _entry(
            patient_url,
            _patient_resource(visit.patient, unit),
            if_none_exist=_if_none_exist(visit.patient, unit),
        ),
        _entry(
            encounter_url,
            _encounter(
                visit,
                patient_url=patient_url,
                end=end,
                encounter_class="FLD" if rng.random() < 0.8 else "AMB",
            ),
        ),
    ]
    for vital in vitals:
        observation = _observation(
            vital,
            values[vital.code],
            patient_url=patient_url,
            encounter_url=encounter_url,
            taken=taken,
        )
        entries.append(_entry(f"urn:uuid:{_uuid(rng)}", observation))
    for code, display, specialty in conditions:
        condition_url = f"urn:uuid:{_uuid(rng)}"
        condition = _condition(
            code,
            display,
            confirmed=rng.random() < 0.5,
            patient_url=patient_url,
            encounter_url=encounter_url,
            day=visit.start.date(),
        )
        entries.append(_entry(condition_url, condition))
        if specialty is not None and rng.random() < 0.35:
            request = _service_request(
                specialty,
                display,
                priority=rng.choices(_PRIORITIES, weights=_PRIORITY_WEIGHTS)[0],
                unit=unit,
                patient_url=patient_url,
                encounter_url=encounter_url,
                condition_url=condition_url,
                authored=end - timedelta(minutes=2),
            )
            entries.append(_entry(f"urn:uuid:{_uuid(rng)}", request))
    return _bundle(rng, entries, end + timedelta(minutes=rng.randint(1, 30)))


def visit_plan(
    seed: int | str,
    *,
    patients: int,
    visits_per_patient: int,
    units: int = DEMO_UNITS,
    start: date = DEMO_START,
    months: int = DEMO_MONTHS,
) -> list[Visit]:
    """Return every visit of the population in chronological order."""
    unit_list = make_units(units)
    stops = _stops_cached(units, start, months)
    stops_at: dict[str, list[TourStop]] = {}
    for stop in stops:
        stops_at.setdefault(stop.commune.slug, []).append(stop)
    visits: list[Visit] = []
    for index in range(patients):
        profile = patient_profile(seed, index, units=unit_list)
        rng = _rng(seed, "plan", index)
        home_stops = stops_at.get(profile.home.slug, [])
        chosen = rng.sample(home_stops, min(visits_per_patient, len(home_stops)))
        # Some people with a national ID are seen by another unit (seasonal work, family):
        # that is what makes the record longitudinal across units.
        if profile.national_id is not None and len(unit_list) > 1 and rng.random() < 0.1:
            elsewhere = [s for s in stops if s.unit != profile.home_unit]
            if chosen and elsewhere:
                chosen[-1] = rng.choice(elsewhere)
        for stop in chosen:
            minute = rng.randrange(9 * 60, 16 * 60)
            moment = datetime(
                stop.day.year, stop.day.month, stop.day.day, tzinfo=MOROCCO_TZ
            ) + timedelta(minutes=minute)
            visits.append(Visit(patient=profile, stop=stop, start=moment))
    visits.sort(key=lambda visit: (visit.start, visit.patient.index))
    return visits


def visit_bundles(
    seed: int | str,
    *,
    patients: int,
    visits_per_patient: int,
    units: int = DEMO_UNITS,
    start: date = DEMO_START,
    months: int = DEMO_MONTHS,
) -> Iterator[JSONObject]:
    """Yield one transaction Bundle per visit, oldest first."""
    plan = visit_plan(
        seed,
        patients=patients,
        visits_per_patient=visits_per_patient,
        units=units,
        start=start,
        months=months,
    )
    for visit in plan:
        yield visit_bundle(seed, visit)


def demo_dataset(seed: int | str = DEMO_SEED) -> tuple[list[JSONObject], list[JSONObject]]:
    """Return the small demo: reference resources and ~90 visit bundles of 30 patients."""
    references = reference_resources(seed)
    bundles = list(
        visit_bundles(seed, patients=DEMO_PATIENTS, visits_per_patient=DEMO_VISITS_PER_PATIENT)
    )
    return references, bundles


# ---------------------------------------------------------------------------
# The benchmark bundle


def _with_national_id(seed: int | str, profile: PatientProfile) -> PatientProfile:
    if profile.national_id is not None:
        return profile
    # The duplicate check counts national IDs, so every benchmark patient has one.
    number = (profile.index * 7919 + _national_id_offset(seed)) % 1_000_000
    prefix = profile.home_unit.region.id_prefixes[0]
    return replace(profile, national_id=f"{prefix}{number:06d}")


def _twelve_entry_bundle(rng: random.Random, profile: PatientProfile, units: int) -> JSONObject:
    home_stops = [
        stop
        for stop in _stops_cached(units, DEMO_START, DEMO_MONTHS)
        if stop.commune == profile.home
    ]
    stop = rng.choice(home_stops)
    moment = datetime(stop.day.year, stop.day.month, stop.day.day, tzinfo=MOROCCO_TZ)
    visit = Visit(profile, stop, moment + timedelta(minutes=rng.randrange(9 * 60, 16 * 60)))
    unit = stop.unit
    patient_url = f"urn:uuid:{_uuid(rng)}"
    encounter_url = f"urn:uuid:{_uuid(rng)}"
    end = visit.start + timedelta(minutes=rng.randint(12, 40))
    values = _vital_values(rng, profile, rng.random() < 0.3)
    taken = visit.start + timedelta(minutes=rng.randint(3, 10))
    entries = [
        _entry(
            patient_url,
            _patient_resource(profile, unit),
            if_none_exist=_if_none_exist(profile, unit),
        ),
        _entry(
            encounter_url,
            _encounter(visit, patient_url=patient_url, end=end, encounter_class="FLD"),
        ),
    ]
    for vital in ALL_VITAL_SIGNS:
        observation = _observation(
            vital,
            values[vital.code],
            patient_url=patient_url,
            encounter_url=encounter_url,
            taken=taken,
        )
        entries.append(_entry(f"urn:uuid:{_uuid(rng)}", observation))
    return _bundle(rng, entries, end + timedelta(minutes=5))


def unit_bundle_12(
    seed: int | str, i: int, *, shared_patients: int, units: int = DEMO_UNITS
) -> JSONObject:
    """Return benchmark bundle `i`: conditional Patient, Encounter and 10 vital signs.

    Patients come from a pool of `shared_patients` that every client shares, so
    concurrent clients send conditional creates for the same national ID. The
    stops are those of `reference_resources(units=units)` (the demo schedule).
    """
    if shared_patients < 1:
        raise ValueError("shared_patients must be at least 1")
    rng = _rng(seed, "bundle12", i)
    profile = patient_profile(seed, rng.randrange(shared_patients), units=_units_cached(units))
    return _twelve_entry_bundle(rng, _with_national_id(seed, profile), units)


HISTORY_PATIENT_INDEX = 999_999


def history_patient(seed: int | str, *, units: int = DEMO_UNITS) -> PatientProfile:
    """Return the one patient of `patient_history_bundles` (outside any benchmark pool)."""
    profile = patient_profile(seed, HISTORY_PATIENT_INDEX, units=_units_cached(units))
    return _with_national_id(seed, profile)


def patient_history_bundles(
    seed: int | str, *, visits: int = 50, units: int = DEMO_UNITS
) -> list[JSONObject]:
    """Return `visits` 12-entry bundles of one patient: 1 + 11 x visits compartment resources."""
    profile = history_patient(seed, units=units)
    return [
        _twelve_entry_bundle(_rng(seed, "history", visit), profile, units)
        for visit in range(visits)
    ]


@lru_cache(maxsize=8)
def _units_cached(count: int) -> tuple[Unit, ...]:
    return tuple(make_units(count))
