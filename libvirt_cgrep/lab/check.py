"""The write-order checker: do these images form one consistent cut?

Reads only. Each image (qcow2 with its backing chain, or raw) is read through
``qemu-img`` with ``-U``, so it works while QEMU holds the images and never
writes or locks them. The verdict is :func:`libvirt_cgrep.core.writeorder.evaluate`. The checker itself
lives in :mod:`libvirt_cgrep.replica.verify` (receivers verify with it too).
"""

from __future__ import annotations

from libvirt_cgrep.replica.verify import check_images, scan_raw

__all__ = ["check_images", "scan_raw"]
