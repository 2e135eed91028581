#!/usr/bin/env bash
# Provision one host of the Vagrant lab: provision.sh primary|replica PRIMARY_IP REPLICA_IP
# Runs as root inside the VM. Idempotent: 'vagrant provision' may run it again.
set -euo pipefail
role=$1 primary_ip=$2 replica_ip=$3
src=/srv/libvirt-cgrep
keys=$src/vagrant/.keys
replica_dir=/var/lib/libvirt-cgrep/replica
cd "$src"

# The same install as 'make test': Debian packages, the venv, daemons, the lab guest.
make install
ln -sf "$src/.venv/bin/virt-cgrep" /usr/local/bin/virt-cgrep

# ssh both ways, root by key only, host keys pinned: points go primary -> replica; after a failover,
# reverse protection and failback go replica -> primary.
case "$role" in
replica) self=replica other=primary other_ip=$primary_ip ;;
primary) self=primary other=replica other_ip=$replica_ip ;;
*)
    echo "provision.sh: role must be primary or replica, not '$role'" >&2
    exit 64
    ;;
esac
install -d -m 0700 /root/.ssh
install -m 0600 "$keys/${self}_host_ed25519" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$keys/${self}_host_ed25519.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -m 0600 "$keys/client_ed25519" /root/.ssh/id_ed25519
install -m 0644 "$keys/client_ed25519.pub" /root/.ssh/id_ed25519.pub
grep -qxF "$(cat "$keys/client_ed25519.pub")" /root/.ssh/authorized_keys 2>/dev/null ||
    cat "$keys/client_ed25519.pub" >> /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
echo "$other_ip $(cut -d' ' -f1,2 "$keys/${other}_host_ed25519.pub")" > /root/.ssh/known_hosts
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\n' > /etc/ssh/sshd_config.d/virt-cgrep-lab.conf
systemctl restart ssh

case "$role" in
replica)
    install -d -m 0700 "$replica_dir"
    ;;
primary)
    # The replica (provisioned first) answers with its pinned key, in batch mode (fails loudly otherwise).
    ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "root@$replica_ip" true

    virt-cgrep hooks install
    install -d -m 0755 /etc/libvirt-cgrep
    [ -e /etc/libvirt-cgrep/agent.toml ] ||
        sed -e 's|^alerts_file = ""|alerts_file = "/var/lib/libvirt-cgrep/alerts.jsonl"|' \
            -e 's|^metrics = ""|metrics = "127.0.0.1:9477"|' contrib/agent.toml.example > /etc/libvirt-cgrep/agent.toml
    install -m 0644 contrib/virt-cgrep-agent.service /etc/systemd/system/virt-cgrep-agent.service
    install -d /etc/systemd/system/virt-cgrep-agent.service.d
    printf '[Service]\nExecStart=\nExecStart=/usr/local/bin/virt-cgrep agent --config /etc/libvirt-cgrep/agent.toml\n' \
        > /etc/systemd/system/virt-cgrep-agent.service.d/lab.conf
    systemctl daemon-reload
    systemctl restart libvirtd    # libvirtd reads hooks at start

    # The protected application: a 2-VM lab group whose dependent writes span both VMs.
    virt-cgrep lab status --group app >/dev/null 2>&1 || virt-cgrep lab up --group app --vms 2 --disks 2 --size 64M
    for d in app-0 app-1; do
        virt-cgrep protect "$d" --group app --target "ssh://root@$replica_ip$replica_dir" --rpo 30s --keep 24 --fence suspend
    done
    systemctl enable --now virt-cgrep-agent
    virt-cgrep status
    ;;
esac
