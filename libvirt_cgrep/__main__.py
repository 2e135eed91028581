"""``python -m libvirt_cgrep`` is ``virt-cgrep``."""

from libvirt_cgrep.cli import main

main()
