"""What the model repository holds now, read without loading anything: each model's version
folders with a fingerprint of their files, and its serving.json.

:func:`scan_repository` is what model control (:mod:`service.model_control`) reads the repository
with, at start-up and at every poll or explicit load; :meth:`service.models.ModelRegistry.plan`
compares what it found with what is served and names the :class:`VersionToLoad` to load.

Concurrency: nothing here touches what is served; while serving, the scan runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ModelContractError
from service.repository import ServingConfig, discover, read_serving_config
from service.settings import Settings


@dataclass(frozen=True)
class ModelScan:
    """What the repository holds of one model: its version folders (version -> fingerprint of
    their files) and its serving.json (``config``, or ``error``: why it is invalid)."""

    name: str
    directory: Path
    versions: dict[str, str]
    config: ServingConfig | None
    error: str = ""


@dataclass(frozen=True)
class VersionToLoad:
    """One version folder to load, with the settings it is served with (the server's, and over
    them ``own_settings``, those its model's serving.json sets)."""

    directory: Path
    settings: Settings
    fingerprint: str
    own_settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.directory.parent.name}/{self.directory.name}"

    @property
    def attempt(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """What a load of it tried: its files and its settings (a refused version is tried
        again, by the poll, only once either changes)."""
        return self.fingerprint, tuple(self.own_settings.items())


def fingerprint(directory: Path) -> str:
    """The files of a version folder (names, sizes, modification times): it changes when a file
    is written, added or removed, without reading any file."""
    parts = []
    for path in sorted(directory.rglob("*")):
        try:
            info = path.stat()
        except OSError:  # removed while listed
            continue
        if path.is_file():
            parts.append(f"{path.relative_to(directory)}:{info.st_size}:{info.st_mtime_ns}")
    return "|".join(parts)


def scan_repository(root: Path, names: Collection[str] | None = None) -> dict[str, ModelScan]:
    """The models under ``root`` (only ``names``, when given), each with its versions and its
    serving.json, read from disk (in a worker thread while serving). A missing repository
    raises ModelContractError."""
    found: dict[str, dict[str, str]] = {}
    for directory in discover(root):
        model = directory.parent.name
        if names is None or model in names:
            found.setdefault(model, {})[directory.name] = fingerprint(directory)
    scans = {}
    for model, versions in sorted(found.items()):
        folder = root / model
        try:
            scans[model] = ModelScan(model, folder, versions, read_serving_config(folder))
        except ModelContractError as error:
            scans[model] = ModelScan(model, folder, versions, None, str(error))
    return scans
