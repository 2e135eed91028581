"""libvirt-cgrep: write-order-consistent replication of multi-disk libvirt/QEMU VMs.

The package is layered (see docs/ARCHITECTURE.md):

- ``core``: pure logic on plain data (names, sizes, record format, write-order
  evaluation, planning). No I/O, no clocks: ``now`` is an argument.
- ``adapters``: thin edges to libvirt, qemu-img/QEMU and the filesystem.
- ``lab``: the lab guest, lab domains and the write-order checker.
- ``cli``: the ``virt-cgrep`` command; the only place that exits.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
