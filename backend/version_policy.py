"""Which versions of a model should be served, given the versions found on disk (TF Serving's version policies).

Plain decision code: no file system, no clock. `latest {num_versions: N}` serves the N highest versions, `all` every
version, `specific {versions: ...}` exactly the listed ones that exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

PolicyKind = Literal["latest", "all", "specific"]


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: PolicyKind = "latest"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def select(self, on_disk: Iterable[int]) -> frozenset[int]:
        available = sorted(set(on_disk), reverse=True)
        if self.kind == "all":
            return frozenset(available)
        if self.kind == "specific":
            return frozenset(v for v in available if v in self.versions)
        return frozenset(available[: self.num_versions])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ",".join(map(str, sorted(self.versions)))
        return "all"


def versions_to_unload(desired: frozenset[int], available: frozenset[int]) -> frozenset[int]:
    """Available versions the policy no longer wants, unloaded only once a wanted version serves.

    This is TF Serving's availability-preserving rule: a new version that is still loading, or failed to load,
    never takes down the version serving now, and an emptied base path does not take a model offline.
    """
    if not desired & available:
        return frozenset()
    return available - desired
