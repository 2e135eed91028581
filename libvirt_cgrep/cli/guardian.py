"""Entry point of the guardian process (``python -m libvirt_cgrep.cli.guardian``)."""

import sys

from libvirt_cgrep.engine.guardian import main

if __name__ == "__main__":
    sys.exit(main())
