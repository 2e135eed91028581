"""Pure core: plain data in, plain data out. No I/O, no clocks, no libvirt."""
