from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from service.server import RnnServer
from service.settings import Settings
from tests.grpc_helpers import serving
from tests.models_for_tests import export_tiny_models


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def make_settings(tiny_repository: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "model_repository": tiny_repository,
            "intra_op_threads": 1,
            "session_ttl_s": 0.0,
            "snapshot_backend": "none",  # durability tests turn it on with their own directory
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
async def server(make_settings: Callable[..., Settings]) -> AsyncIterator[RnnServer]:
    async with serving(make_settings()) as srv:
        yield srv
