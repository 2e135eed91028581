"""Backing chains as plain tuples of image paths, active image first. Pure."""

from __future__ import annotations

from libvirt_cgrep.errors import StateError


def check_fold(chain: tuple[str, ...], base: str, top: str, name: str, target: str) -> None:
    """StateError unless ``top`` is a non-active layer strictly above ``base`` in ``chain``."""
    if top not in chain[1:] or base not in chain or chain.index(base) <= chain.index(top):
        raise StateError(f"{name}/{target}: cannot fold {top} into {base}: not in the chain below the active image")
