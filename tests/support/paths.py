"""Where things are: the repository, the tests, and the recorded devices they serve."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CAPTURES", "FIXTURES", "ROOT", "SUPPORT", "SYSFS", "TESTS", "TXT", "XML"]

SUPPORT = Path(__file__).resolve().parent
TESTS = SUPPORT.parent
ROOT = TESTS.parent

# Recorded real devices, with their sources and licences (fixtures/SOURCES.md).
FIXTURES = TESTS / "fixtures"
XML = FIXTURES / "nvidia-smi-xml"
TXT = FIXTURES / "nvidia-smi-captures"
CAPTURES = sorted([*XML.glob("*.xml"), *TXT.glob("*.txt")])
SYSFS = FIXTURES / "sysfs-procfs" / "sys"

if len(CAPTURES) < 25:
    raise RuntimeError(f"the recorded captures are missing from {FIXTURES}")
