"""Distances on the Earth for Location `near`: great circles on a sphere of the mean radius.

R4 leaves the accuracy of `near` to the server. A sphere of the WGS84 mean
radius is within 0.5% of the ellipsoid everywhere, far below what "near" asks;
the SQL (`fhir_api.search.repository`) and the in-memory match of a bundle's
own resources (`fhir_api.criteria`) use the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# IUGG mean radius R1 of the WGS84 ellipsoid.
EARTH_RADIUS_KM = 6371.0088
# What `near` means without a distance (R4 leaves it to the server): a commune's reach.
DEFAULT_NEAR_KM = 10.0
# UCUM length units a `near` distance may be given in, as kilometres.
KILOMETRES_PER_UNIT = {
    "km": 1.0,
    "m": 0.001,
    "cm": 0.00001,
    "[mi_i]": 1.609344,
    "[mi_us]": 1.609347219,
    "[nmi_i]": 1.852,
    "[yd_i]": 0.0009144,
    "[ft_i]": 0.0003048,
}


@dataclass(frozen=True, slots=True)
class NearPoint:
    """A `near` value: a WGS84 point and how far from it, in kilometres."""

    latitude: float
    longitude: float
    distance_km: float

    def latitude_range(self) -> tuple[float, float]:
        """Return the band of latitudes the circle spans, in degrees."""
        spread = math.degrees(self.distance_km / EARTH_RADIUS_KM)
        return max(self.latitude - spread, -90.0), min(self.latitude + spread, 90.0)

    def longitude_ranges(self) -> list[tuple[float, float]]:
        """Return the longitudes the circle spans, split at the antimeridian, in degrees."""
        angle = self.distance_km / EARTH_RADIUS_KM
        low, high = self.latitude_range()
        if low <= -90.0 or high >= 90.0 or angle >= math.pi / 2:
            # The circle takes in a pole (or a hemisphere): every longitude.
            return [(-180.0, 180.0)]
        # The widest longitude of a circle on a sphere (not at its centre's latitude).
        ratio = math.sin(angle) / math.cos(math.radians(self.latitude))
        spread = 180.0 if ratio >= 1 else math.degrees(math.asin(ratio))
        west, east = self.longitude - spread, self.longitude + spread
        if west < -180.0:
            return [(-180.0, east), (west + 360.0, 180.0)]
        if east > 180.0:
            return [(west, 180.0), (-180.0, east - 360.0)]
        return [(west, east)]


def great_circle_km(latitude: float, longitude: float, other_lat: float, other_lon: float) -> float:
    """Return the haversine distance between two WGS84 points, in kilometres."""
    phi, other_phi = math.radians(latitude), math.radians(other_lat)
    half_lat = math.sin((other_phi - phi) / 2)
    half_lon = math.sin(math.radians(other_lon - longitude) / 2)
    chord = half_lat * half_lat + math.cos(phi) * math.cos(other_phi) * half_lon * half_lon
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(chord)))
