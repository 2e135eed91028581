"""QEMU's block replies (``query-block``, ``query-named-block-nodes``) read as disks and chains. Pure.

Nothing here talks to QEMU: ``engine.qmp_backend`` sends the queries over
``adapters.qmp`` and hands the replies (plain dicts and lists) to these
functions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from libvirt_cgrep.core.model import Disk
from libvirt_cgrep.errors import StateError

#: ``qdev`` of a device given ``id=NAME``: ``/machine/peripheral/NAME/...``
_QDEV_ID = re.compile(r"^/machine/peripheral/([^/]+)(?:/|$)")
#: QEMU's limit on node names (``char node_name[32]``).
_NODE_NAME_MAX = 31
#: Node names the planner gives overlays (``core.plan.overlay_node``).
OUR_NODE = re.compile(r"^cg-[A-Za-z0-9_-]+$")
#: File names the planner gives overlays (``core.plan.overlay_path``).
OUR_FILE = re.compile(r"\.cgrep-[0-9A-Za-z-]+\.qcow2$")
#: Protocol drivers: their nodes share the image's filename with the format node above them.
PROTOCOLS = frozenset({"file", "host_device", "host_cdrom"})


def file_node_name(overlay_node: str) -> str:
    """The node name of an overlay's file (protocol) node: ``<overlay node>-f``, within 31 chars."""
    return overlay_node[: _NODE_NAME_MAX - 2] + "-f"


def target_of(dev: Mapping[str, Any]) -> str:
    """The qdev id (``vda`` from ``-device ...,id=vda``), else the device name, else the top node name."""
    m = _QDEV_ID.match(str(dev.get("qdev") or ""))
    if m:
        return m.group(1)
    if dev.get("device"):
        return str(dev["device"])
    inserted = dev.get("inserted") or {}
    return str(inserted.get("node-name") or dev.get("qdev") or "?")


def chain_of(image: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The filenames of an ``image`` reply and its ``backing-image``s, top first."""
    out: list[str] = []
    while image:
        out.append(str(image.get("filename", "")))
        image = image.get("backing-image")
    return tuple(out)


def disks_of(block: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]) -> tuple[Disk, ...]:
    """Disks from ``query-block`` and ``query-named-block-nodes`` replies, each with why it is unsupported."""
    file_nodes = {str(n.get("file")) for n in nodes if n.get("drv") == "file"}
    out: list[Disk] = []
    for dev in block:
        target = target_of(dev)
        inserted = dev.get("inserted")
        device = "cdrom" if dev.get("removable") else "disk"
        if not inserted:
            out.append(Disk(target, "", "", (), None, device, False, "no medium"))
            continue
        image = inserted.get("image") or {}
        top = str(image.get("filename") or inserted.get("file") or "")
        fmt = str(inserted.get("drv") or image.get("format") or "")
        reason = None
        if inserted.get("ro"):
            reason = "read-only"
        elif fmt != "qcow2":
            reason = f"{fmt} image (qcow2 is required)"
        elif top not in file_nodes:
            reason = f"image {top!r} is not a local file (protocol other than file)"
        elif not os.path.isabs(top):
            reason = f"image path {top!r} is relative to QEMU's working directory"
        out.append(
            Disk(
                target=target,
                image=top,
                format=fmt,
                chain=chain_of(image) or (top,),
                node=inserted.get("node-name"),
                device=device,
                supported=reason is None,
                reason=reason,
            )
        )
    return tuple(out)


def layer_nodes(chain: Sequence[str], top_node: str, nodes: Sequence[Mapping[str, Any]], where: str) -> tuple[str, ...]:
    """The format node name of every layer of ``chain`` (active first).

    ``nodes`` is the reply of ``query-named-block-nodes`` with ``flat: false``
    (each node's image with its backing images). The active layer's node is
    ``top_node``; a lower layer's node is the one non-protocol node whose
    image chain is exactly that layer and the layers below it.
    StateError when a layer has no such node, or several.
    """
    out = [top_node]
    for i in range(1, len(chain)):
        below = tuple(chain[i:])
        found = [str(n.get("node-name")) for n in nodes if n.get("drv") not in PROTOCOLS and chain_of(n.get("image")) == below]
        if len(found) != 1:
            what = "no node" if not found else f"several nodes ({', '.join(found)})"
            raise StateError(f"{where}: {what} for layer {chain[i]} of the chain")
        out.append(found[0])
    return tuple(out)


def not_ours(merged: Sequence[str], nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``merged`` node names that are not overlays a prepare made (format node ``cg-...`` with a ``-f`` file node)."""
    names = {str(n.get("node-name")) for n in nodes}
    return [node for node in merged if not OUR_NODE.match(node) or file_node_name(node) not in names]


def garbage_layers(
    block: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]], pending: Collection[str]
) -> list[tuple[str, str]]:
    """(format node, file) of every overlay layer of ours that no disk uses, upper layers first.

    ``block`` is ``query-block``, ``nodes`` ``query-named-block-nodes`` with
    ``flat: false``. A layer is ours when a prepare made it: format node
    ``cg-...`` with file node ``<node>-f`` on a ``*.cgrep-*.qcow2`` file; it is
    garbage when its file is in no disk's chain and its node is not in
    ``pending`` (prepared for a cut still to come).
    """
    live = {f for d in block for f in chain_of((d.get("inserted") or {}).get("image"))}
    by_name = {str(n.get("node-name")): n for n in nodes}
    garbage = []
    for n in nodes:
        node = str(n.get("node-name"))
        proto = by_name.get(file_node_name(node)) or {}
        # The file node names the file: a format node added with "backing": null reports a json: filename.
        filename = str(proto.get("file") or "")
        if (
            OUR_NODE.match(node)
            and n.get("drv") not in PROTOCOLS
            and node not in pending
            and proto.get("drv") == "file"
            and filename not in live
            and OUR_FILE.search(filename)
        ):
            garbage.append((len(chain_of(n.get("image"))), node, filename))
    return [(node, filename) for _, node, filename in sorted(garbage, reverse=True)]
