"""Unit tests of the pure recovery core: XML rewrite, identity, journal, held points."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core import recovery as rc
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import ConflictError, StateError, UsageError
from libvirt_cgrep.replica.store import Store

XML = """<domain type='kvm'>
  <name>db1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata>
    <cgrep:protection xmlns:cgrep="urn:x-libvirt-cgrep:protection:1" target="/srv/r" rpo="60"/>
    <lab:lab xmlns:lab="urn:x-libvirt-cgrep:lab:1" dir="/var/lib/x/db1"/>
    <other:thing xmlns:other="urn:example:keep"/>
  </metadata>
  <memory unit='MiB'>256</memory>
  <os><type>hvm</type><kernel>/boot/vmlinuz</kernel><nvram>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/vda.cgrep-x.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/p/vda.qcow2'/></backingStore><target dev='vda'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/p/scratch.raw'/><target dev='vdz'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='prod'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cd'/><source bridge='br-db'/></interface>
    <hostdev mode='subsystem' type='pci'><source><address bus='0x3'/></source></hostdev>
    <serial type='pty'><log file='/var/log/db1.log' append='on'/><target port='0'/></serial>
    <graphics type='vnc' port='5901' autoport='no'/>
  </devices>
</domain>"""

HOST = rc.HostFacts(frozenset({"default"}), frozenset({"br-db"}), frozenset({"/boot/vmlinuz"}))


def rewrite(**kw: object) -> rc.Rewrite:
    args: dict[str, object] = {
        "name": "db1-test",
        "uuid": "99999999-2222-3333-4444-555555555555",
        "overlays": {"vda": "/t/recovery/run/db1/vda.qcow2"},
        "files_dir": "/t/recovery/run/db1",
        "nics": rc.NicPolicy("keep", "default"),
        "host": HOST,
        "recovery": {"run": "test-20261125T000000.000000Z", "kind": "test-failover"},
    }
    args.update(kw)
    return rc.rewrite_domain_xml(XML, **args)  # type: ignore[arg-type]


def test_rewrite_disks_nics_devices_files_metadata() -> None:
    rw = rewrite()
    root: Any = etree.fromstring(rw.xml.encode())
    assert root.findtext("name") == "db1-test" and root.findtext("uuid").startswith("9999")
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "sda"]  # unprotected vdz removed
    vda = disks[0]
    assert vda.find("source").get("file") == "/t/recovery/run/db1/vda.qcow2" and vda.find("backingStore") is None
    assert vda.find("driver").get("type") == "qcow2"
    assert disks[1].find("source") is None  # cdrom ejected
    nics = root.findall("devices/interface")
    assert [n.find("source").get("network") for n in nics] == ["default", None]  # missing 'prod' remapped
    assert nics[1].find("source").get("bridge") == "br-db"  # the bridge exists here
    assert root.find("devices/hostdev") is None
    assert root.find("devices/serial/log").get("file") == "/t/recovery/run/db1/serial0.log"
    assert root.find("os/nvram").text == "/t/recovery/run/db1/nvram.fd"
    g = root.find("devices/graphics")
    assert g.get("autoport") == "yes" and g.get("port") is None
    meta = root.find("metadata")
    namespaces = {etree.QName(c.tag).namespace for c in meta}
    assert namespaces == {"urn:example:keep", rc.RECOVERY_NS}
    assert meta.find(f"{{{rc.RECOVERY_NS}}}recovery").get("kind") == "test-failover"
    text = " | ".join(f.text() for f in rw.findings)
    for word in ("vdz", "ejected", "remapped to network default", "hostdev", "nvram", "autoport"):
        assert word in text, word
    assert not [f for f in rw.findings if f.severity == rc.BLOCKING]


def test_missing_network_without_remap_and_missing_kernel_block() -> None:
    rw = rewrite(nics=rc.NicPolicy("keep", None), host=rc.HostFacts(frozenset(), frozenset({"br-db"}), frozenset()))
    blocking = [f for f in rw.findings if f.severity == rc.BLOCKING]
    assert len(blocking) == 2 and "--network" in blocking[0].text() and "vmlinuz" in blocking[1].text()


def test_isolate_and_remove_nics_and_fresh_macs() -> None:
    root: Any = etree.fromstring(rewrite(nics=rc.NicPolicy("isolate", "iso"), fresh_macs=True).xml.encode())
    nics = root.findall("devices/interface")
    assert [(n.get("type"), n.find("source").get("network"), n.find("mac")) for n in nics] == [
        ("network", "iso", None),
        ("network", "iso", None),
    ]
    root = etree.fromstring(rewrite(nics=rc.NicPolicy("remove")).xml.encode())
    assert root.find("devices/interface") is None


def test_keep_protection_metadata_for_failback() -> None:
    root: Any = etree.fromstring(rewrite(keep_ns=("urn:x-libvirt-cgrep:protection:1",)).xml.encode())
    assert root.find("metadata/{urn:x-libvirt-cgrep:protection:1}protection") is not None


def test_rewrite_refuses_a_point_disk_the_xml_lacks() -> None:
    with pytest.raises(UsageError):
        rewrite(overlays={"vdq": "/x.qcow2"})


def test_identity() -> None:
    u = "11111111-2222-3333-4444-555555555555"
    new = "99999999-2222-3333-4444-555555555555"
    ident = rc.choose_identity("test-failover", "db1", u, None, force=False, suffix="-test", new_uuid=new)
    assert (ident.name, ident.uuid) == ("db1-test", new)
    assert rc.choose_identity("failover", "db1", u, None, force=False, suffix="", new_uuid=new) == rc.Identity(
        "db1", u, False, None
    )
    running = rc.Existing("db1", u, True, False)
    with pytest.raises(StateError, match="--force"):
        rc.choose_identity("failover", "db1", u, running, force=False, suffix="", new_uuid=new)
    ident = rc.choose_identity("failover", "db1", u, running, force=True, suffix="", new_uuid=new)
    assert (ident.name, ident.uuid, ident.replaces) == ("db1-failover", new, False)
    stopped = rc.Existing("db1", u, False, False)
    with pytest.raises(ConflictError, match="--force"):
        rc.choose_identity("failover", "db1", u, stopped, force=False, suffix="", new_uuid=new)
    assert rc.choose_identity("failover", "db1", u, stopped, force=True, suffix="", new_uuid=new).replaces
    ours = rc.Existing("db1", u, True, True)  # a resumed run's own domain
    assert rc.choose_identity("failover", "db1", u, ours, force=False, suffix="", new_uuid=new).name == "db1"


def test_journal_round_trip_and_version() -> None:
    j = rc.Journal(
        run="test-20261125T000000.000000Z",
        kind="test-failover",
        set_name="s",
        point_id="20261125T000000.000000Z",
        uri="qemu:///system",
        state="preparing",
        created_utc="t",
        updated_utc="t",
        directory="/t/s/recovery/test-20261125T000000.000000Z",
        domains=(rc.DomainRun("db1", "db1-test", "u", "<domain/>", None, (("vda", "/x.qcow2"),)),),
        findings=(rc.Finding("db1", "nic", "p", "a"),),
    )
    j2 = j.step("t2", "started", state="active").with_domain(rc.DomainRun("db1", "db1-test", "u", step="started"))
    back = rc.journal_from_dict(j2.to_dict())
    assert back == j2 and back.domain("db1").step == "started" and back.log[-1] == ("t2", "started")  # type: ignore[union-attr]
    with pytest.raises(UsageError):
        rc.journal_from_dict({**j.to_dict(), "version": 2})
    assert rc.valid_run_id(j.run) and not rc.valid_run_id("test-../x")


def test_held_points_never_pruned() -> None:
    held = rc.held_points([{"point_id": "b", "state": "active"}, {"point_id": "d", "state": "done"}])
    assert held == ("b",)
    assert rc.prunable(["a", "b", "c"], held) == ("c",)  # b is held, a lies under it
    assert rc.prunable(["a", "c"], ()) == ("a", "c")
    assert rc.prunable(["a", "c"], rc.held_points([{"state": "active"}])) == ()  # unreadable: hold everything


def test_store_prune_keeps_held_points_and_older(tmp_path: Path) -> None:
    """A running recovered domain's point and every older point survive retention; newer ones are merged away."""
    store = Store.open(tmp_path / "t")
    ids = [f"20261125T00000{i}.000000Z" for i in range(5)]
    prev = None
    for pid in ids[:4]:
        staged = store.stage("s", pid, prev, [("d", "vda", 1 << 20, prev is None)])
        m = mf.Manifest(
            pid,
            pid,
            "s",
            None,
            prev.point_id if prev else None,
            "none",
            "crash",
            (),
            (mf.DiskRecord("d", "vda", "", None, 1 << 20, 0, "", "/src", "/base"),),
        )
        prev = store.commit("s", m, staged, {})
    held = rc.Journal(f"test-{ids[1]}", "test-failover", "s", ids[1], "u", "active", "t", "t", "/x")
    (store.set_dir("s") / "recovery").mkdir()
    (store.set_dir("s") / "recovery" / f"{held.run}.json").write_text(json.dumps(held.to_dict()))
    before = {m.point_id: m.disks[0].sha256 for m in store.points("s")}
    now = datetime(2026, 11, 26, tzinfo=UTC)
    assert store.prune("s", Policy(keep_last=1), now) == [ids[2]]
    after = {m.point_id: m.disks[0].sha256 for m in store.points("s")}
    assert sorted(after) == [ids[0], ids[1], ids[3]]
    assert after[ids[0]] == before[ids[0]] and after[ids[1]] == before[ids[1]]
    (store.set_dir("s") / "recovery" / f"{held.run}.json").write_text(json.dumps({**held.to_dict(), "state": "done"}))
    assert store.prune("s", Policy(keep_last=1), now) == [ids[0], ids[1]]
    store.close()


def test_status_shows_recovery_runs(tmp_path: Path) -> None:
    from libvirt_cgrep.cli.agent import _recovery_state

    root = tmp_path / "t"
    Store.open(root).close()
    (root / "s" / "points").mkdir(parents=True)
    assert _recovery_state(str(root), "s") is None
    j = rc.Journal("test-20261125T000000.000000Z", "test-failover", "s", "20261125T000000.000000Z", "u", "active", "t", "t", "/x")
    (root / "s" / "recovery").mkdir()
    (root / "s" / "recovery" / f"{j.run}.json").write_text(json.dumps(j.to_dict()))
    assert _recovery_state(str(root), "s") == f"test-failover ({j.run})"
    assert _recovery_state("ssh://h/x", "s") is None
