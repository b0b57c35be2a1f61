"""Attention backends, one file each. Adding a backend touches no model file: register it here."""

from .base import Backend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend
from .triton import TritonBackend
from .xformers import XFormersBackend

BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (ReferenceBackend, SDPABackend, XFormersBackend, TritonBackend, FlexBackend)
}


def get_backend(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}") from None


def register_backend(backend: type[Backend]) -> type[Backend]:
    """Make a new backend selectable by name and eligible for auto dispatch (appended last)."""
    BACKENDS[backend.name] = backend
    from ..plan import clear_plans

    clear_plans()  # auto orders and named selections may now resolve differently
    return backend


__all__ = ["Backend", "BACKENDS", "get_backend", "register_backend",
           "ReferenceBackend", "SDPABackend", "XFormersBackend", "TritonBackend", "FlexBackend"]
