"""The parts a :class:`~sqla_tenancy.Tenancy` is built of, as the operations below the facade use
them (lifecycle, installer, export, the migration runner): explicit collaborators instead of the
facade itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import TenancyConfig
from .engines import Engines
from .errors import UnknownPlacement
from .placements import Placement
from .registry import Registry, TenantStore
from .routing import Router
from .steps import Steps

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    """One Tenancy's configuration, engines, registry (cache and store), router, placements and
    provisioning steps."""

    config: TenancyConfig
    engines: Engines
    registry: Registry
    store: TenantStore
    router: Router
    placements: Mapping[str, Placement]
    steps: Steps

    def placement(self, name: str) -> Placement:
        """The placement called ``name`` (:class:`UnknownPlacement` if there is none)."""
        try:
            return self.placements[name]
        except KeyError:
            raise UnknownPlacement(name, list(self.placements)) from None
