"""Which versions of a model should be served, given the versions found on disk (TF Serving's version policies).

Plain decision code: no file system, no clock. `version_directories` reads version numbers from a base path's
entry names, `latest {num_versions: N}` serves the N highest versions, `all` every version, `specific {versions:
...}` exactly the listed ones that exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

PolicyKind = Literal["latest", "all", "specific"]

_VERSION_NAME = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes "²", which int() then refuses
MAX_VERSION = 2**63 - 1  # versions are int64 in TF Serving's protos, URLs and directory parser


def version_directories(names: Iterable[str]) -> tuple[dict[int, str], list[tuple[int, str, str]]]:
    """The version each entry name denotes, and the directory it is read from, as TF Serving reads them: a name of
    digits within int64 ("0007" is version 7, read from 0007/); other names are not versions (TF Serving's parser
    also takes a sign or spaces, "-1" or " 3", but a request's /versions/N could not name those). When two names
    denote one version, the one sorting last is read, as in TF Serving; those clashes are returned too, as
    (version, name read, name ignored), for a warning."""
    directories: dict[int, str] = {}
    clashes: list[tuple[int, str, str]] = []
    for name in sorted(names):
        if _VERSION_NAME.fullmatch(name) is None or int(name) > MAX_VERSION:
            continue
        version = int(name)
        if version in directories:
            clashes.append((version, name, directories[version]))
        directories[version] = name
    return directories, clashes


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
