"""(Being built: issue 14.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sockstack.gateway.pattern import Gateway


def install(gateway: Gateway) -> None:
    """Nothing yet."""
