#!/bin/bash
set -u
scripts/start-daemons
term() { local t0=$(date +%s.%N); pkill -TERM -x libvirtd; while pgrep -x libvirtd >/dev/null; do sleep 0.05; done; python3 -c "import sys; print(sys.argv[1], round(float(sys.argv[2])-float(sys.argv[3]),2))" "$1" "$(date +%s.%N)" "$t0"; }
term idle
scripts/start-daemons
cat > /tmp/d.xml <<X
<domain type='qemu'><name>lvt</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/var/cache/libvirt-cgrep/lab/vmlinuz</kernel><initrd>/var/cache/libvirt-cgrep/lab/initrd.img</initrd><cmdline>console=ttyS0</cmdline></os>
<features><acpi/></features><devices><serial type='pty'/><console type='pty'/></devices></domain>
X
ls -la /var/cache/libvirt-cgrep/lab/ | head
virsh -q create /tmp/d.xml
sleep 3
term one-domain
scripts/start-daemons
virsh -q list
virsh event --all --loop >/dev/null 2>&1 &
sleep 1
term domain+event-client
scripts/start-daemons
python3 - <<P &
import libvirt, time
c = libvirt.open("qemu:///system")
d = c.lookupByName("lvt")
while True:
    try:
        d.blockJobInfo("vda", 0) if False else d.info()
    except Exception as e:
        print("err", e); break
    time.sleep(0.1)
P
sleep 1
term domain+polling-client
kill %1 %2 2>/dev/null
scripts/start-daemons
virsh -q destroy lvt
