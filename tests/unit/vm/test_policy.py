"""The VM host-access policy: every element of a domain XML that reaches the host.

Paths are resolved for real in a temporary directory (symlinks, ``..``): no root needed.
``{ok}`` in a case is a directory the policy allows (``vm.allowed_paths``), ``{sd}`` a
storage domain's images, ``{fw}`` a firmware directory and ``{nv}`` an NVRAM directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from lxml import etree

from virtnode.config import VmConfig
from virtnode.errors import InvalidArgument, PermissionDenied
from virtnode.vm.policy import Policy, Use, check_device, check_domain
from virtnode.vm.spec import check_spec, disk_element, domain_xml

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    found = {}
    for key in ("ok", "sd", "fw", "nv"):
        path = tmp_path / key
        path.mkdir()
        (path / "a.img").write_bytes(b"")
        found[key] = str(path)
    # A link out to a host file, and one to another allowed directory.
    os.symlink("/etc/shadow", tmp_path / "ok" / "shadow-link")
    os.symlink(tmp_path / "sd" / "a.img", tmp_path / "ok" / "inner-link")
    return found


def make_policy(dirs: dict[str, str], **flags: bool) -> Policy:
    config = VmConfig(allowed_paths=(dirs["ok"],), firmware_paths=(dirs["fw"],),
                      nvram_paths=(dirs["nv"],), **flags)
    return Policy.of(config, [dirs["sd"]])


def domain(devices: str = "", os_extra: str = "", top: str = "", kind: str = "kvm") -> str:
    return (f"<domain type='{kind}'><name>vm1</name><memory unit='MiB'>64</memory>{top}"
            f"<os><type arch='x86_64' machine='q35'>hvm</type>{os_extra}</os>"
            f"<devices>{devices}</devices></domain>")


def disk(path: str, kind: str = "file", attr: str = "file", *, fmt: str = "raw",
         extra: str = "", device: str = "disk") -> str:
    return (f"<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'/>"
            f"<source {attr}='{path}'/>{extra}<target dev='vda' bus='virtio'/></disk>")


def check(xml: str, dirs: dict[str, str], **flags: bool) -> etree._Element:
    root = etree.fromstring(xml.format(**dirs))
    check_domain(root, make_policy(dirs, **flags))
    return root


def denied(xml: str, dirs: dict[str, str], **flags: bool) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as caught:
        check(xml, dirs, **flags)
    return caught.value


SERIAL_TCP = "<serial type='tcp'><source mode='{mode}' host='{host}' service='4555'/></serial>"

#: (id, xml, reason, field): each is refused by the default policy.
REFUSED: list[tuple[str, str, str, str]] = [
    # Disks and their chains.
    ("disk-file", domain(disk("/etc/shadow")), "path_not_allowed", "xml.devices.disk[1].source"),
    ("disk-block", domain(disk("/dev/vda", "block", "dev")), "path_not_allowed",
     "xml.devices.disk[1].source"),
    ("disk-dir", domain(disk("/", "dir", "dir")), "path_not_allowed",
     "xml.devices.disk[1].source"),
    ("cdrom", domain(disk("/root/secret.iso", device="cdrom")), "path_not_allowed",
     "xml.devices.disk[1].source"),
    ("second-disk", domain(disk("{ok}/a.img") + disk("/etc/shadow")), "path_not_allowed",
     "xml.devices.disk[2].source"),
    ("pool-volume", domain("<disk type='volume'><driver type='raw'/>"
                           "<source pool='default' volume='x'/><target dev='vda'/></disk>"),
     "path_not_allowed", "xml.devices.disk[1].source"),
    ("backing-store", domain(disk("{ok}/a.img", fmt="qcow2", extra=(
        "<backingStore type='file'><format type='raw'/><source file='/etc/shadow'/>"
        "</backingStore>"))), "path_not_allowed", "xml.devices.disk[1].backingStore.source"),
    ("symlink-into-etc", domain(disk("{ok}/shadow-link")), "path_not_allowed",
     "xml.devices.disk[1].source"),
    ("dotdot-escape", domain(disk("{ok}/../../../../../../../../etc/shadow")),
     "path_not_allowed", "xml.devices.disk[1].source"),
    ("prefix-lookalike", domain(disk("{ok}x/a.img")), "path_not_allowed",
     "xml.devices.disk[1].source"),
    ("qcow2-without-chain", domain(disk("{ok}/a.img", fmt="qcow2")), "backing_chain_required",
     "xml.devices.disk[1].source"),
    ("unnamed-format-without-chain", domain(
        "<disk type='file'><source file='{ok}/a.img'/><target dev='vda'/></disk>"),
     "backing_chain_required", "xml.devices.disk[1].source"),
    ("qcow2-backing-layer-without-chain", domain(disk("{ok}/a.img", fmt="qcow2", extra=(
        "<backingStore type='file'><format type='qcow2'/><source file='{sd}/a.img'/>"
        "</backingStore>"))), "backing_chain_required",
     "xml.devices.disk[1].backingStore.source"),
    ("data-store", domain(disk("{ok}/a.img", extra="<backingStore/>").replace(
        "<source file='{ok}/a.img'/>", "<source file='{ok}/a.img'><dataStore type='file'>"
        "<format type='raw'/><source file='/etc/shadow'/></dataStore></source>")),
     "path_not_allowed", "xml.devices.disk[1].source.dataStore.source"),
    ("reservations-socket", domain(disk("{ok}/a.img").replace(
        "<source file='{ok}/a.img'/>", "<source file='{ok}/a.img'><reservations managed='no'>"
        "<source type='unix' path='/run/libvirt/libvirt-sock' mode='client'/></reservations>"
        "</source>")), "path_not_allowed", "xml.devices.disk[1].source.reservations.source"),
    # Network disks.
    ("network-disk", domain(disk("x", "network", "name").replace(
        "name='x'/>", "protocol='nbd' name='x'><host name='evil.example'/></source>")),
     "network_disk_refused", "xml.devices.disk[1]"),
    ("protocol-without-type", domain(disk("{ok}/a.img").replace(
        "<source file", "<source protocol='http' file")), "network_disk_refused",
     "xml.devices.disk[1]"),
    ("network-backing-layer", domain(disk("{ok}/a.img", fmt="qcow2", extra=(
        "<backingStore type='network'><format type='raw'/>"
        "<source protocol='nbd' name='x'><host name='evil.example'/></source>"
        "</backingStore>"))), "network_disk_refused", "xml.devices.disk[1].backingStore"),
    # Firmware and boot.
    ("kernel", domain(os_extra="<kernel>/etc/shadow</kernel>"), "path_not_allowed",
     "xml.os.kernel"),
    ("initrd", domain(os_extra="<initrd>/etc/shadow</initrd>"), "path_not_allowed",
     "xml.os.initrd"),
    ("dtb", domain(os_extra="<dtb>/etc/shadow</dtb>"), "path_not_allowed", "xml.os.dtb"),
    ("acpi-table", domain(os_extra="<acpi><table type='slic'>/etc/shadow</table></acpi>"),
     "path_not_allowed", "xml.os.acpi.table"),
    ("loader", domain(os_extra="<loader readonly='yes' type='pflash'>/etc/shadow</loader>"),
     "path_not_allowed", "xml.os.loader"),
    ("writable-loader-from-firmware", domain(
        os_extra="<loader type='pflash'>{fw}/a.img</loader>"), "path_not_allowed",
     "xml.os.loader"),
    ("nvram", domain(os_extra="<nvram>/etc/shadow</nvram>"), "path_not_allowed", "xml.os.nvram"),
    ("nvram-template", domain(os_extra="<nvram template='/etc/shadow'>{nv}/vm1.fd</nvram>"),
     "path_not_allowed", "xml.os.nvram"),
    ("nvram-in-firmware-dir", domain(os_extra="<nvram>{fw}/a.img</nvram>"),
     "path_not_allowed", "xml.os.nvram"),
    ("nvram-typed", domain(os_extra="<nvram type='file'><source file='/etc/shadow'/></nvram>"),
     "path_not_allowed", "xml.os.nvram.source"),
    ("nvram-network", domain(os_extra="<nvram type='network'><source protocol='iscsi' "
                                      "name='iqn.x/0'><host name='evil.example'/></source>"
                                      "</nvram>"), "network_disk_refused", "xml.os.nvram"),
    ("bootloader", domain(top="<bootloader>/usr/bin/pygrub</bootloader>"), "script_refused",
     "xml.bootloader"),
    ("fw-cfg-file", domain(top="<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/>"
                               "</sysinfo>"), "path_not_allowed", "xml.sysinfo.entry"),
    # Character devices.
    ("serial-file", domain("<serial type='file'><source path='/etc/shadow'/></serial>"),
     "path_not_allowed", "xml.devices.serial[1].source"),
    ("parallel-file", domain("<parallel type='file'><source path='/etc/cron.d/x'/></parallel>"),
     "path_not_allowed", "xml.devices.parallel[1].source"),
    ("console-unix", domain("<console type='unix'><source mode='connect' "
                            "path='/run/libvirt/libvirt-sock'/></console>"),
     "path_not_allowed", "xml.devices.console[1].source"),
    ("channel-unix", domain("<channel type='unix'><source mode='bind' path='/etc/x'/>"
                            "<target type='virtio' name='x'/></channel>"),
     "path_not_allowed", "xml.devices.channel[1].source"),
    ("chardev-log", domain("<serial type='pty'><log file='/etc/shadow'/></serial>"),
     "path_not_allowed", "xml.devices.serial[1].log"),
    ("serial-dev", domain("<serial type='dev'><source path='/dev/ttyS0'/></serial>"),
     "hostdev_refused", "xml.devices.serial[1]"),
    ("serial-pipe", domain("<serial type='pipe'><source path='{ok}/p'/></serial>"),
     "chardev_refused", "xml.devices.serial[1]"),
    ("serial-udp", domain("<serial type='udp'><source mode='bind' host='127.0.0.1' "
                          "service='1'/><source mode='connect' host='10.0.0.1' service='2'/>"
                          "</serial>"), "chardev_refused", "xml.devices.serial[1]"),
    ("serial-tcp-connect", domain(SERIAL_TCP.format(mode="connect", host="127.0.0.1")),
     "chardev_refused", "xml.devices.serial[1].source"),
    ("serial-tcp-listen-everywhere", domain(SERIAL_TCP.format(mode="bind", host="0.0.0.0")),
     "chardev_refused", "xml.devices.serial[1].source"),
    ("serial-tcp-listen-no-host", domain("<serial type='tcp'><source mode='bind' "
                                         "service='4555'/></serial>"),
     "chardev_refused", "xml.devices.serial[1].source"),
    ("rng-egd-connect", domain("<rng model='virtio'><backend model='egd' type='tcp'>"
                               "<source mode='connect' host='10.0.0.1' service='1'/></backend>"
                               "</rng>"), "chardev_refused", "xml.devices.rng[1].backend.source"),
    # Shares.
    ("filesystem-root", domain("<filesystem type='mount'><source dir='/'/>"
                               "<target dir='root'/><readonly/></filesystem>"),
     "path_not_allowed", "xml.devices.filesystem[1].source"),
    ("filesystem-writable", domain("<filesystem type='mount'><source dir='{ok}'/>"
                                   "<target dir='data'/></filesystem>"),
     "writable_share_refused", "xml.devices.filesystem[1]"),
    ("virtiofsd-binary", domain("<filesystem type='mount'><driver type='virtiofs'/>"
                                "<binary path='/tmp/evil'/><source dir='{ok}'/>"
                                "<target dir='data'/><readonly/></filesystem>"),
     "script_refused", "xml.devices.filesystem[1].binary"),
    ("filesystem-template", domain("<filesystem type='template'><source name='x'/>"
                                   "<target dir='/'/></filesystem>"),
     "path_not_allowed", "xml.devices.filesystem[1].source"),
    # NICs.
    ("ethernet-script", domain("<interface type='ethernet'><script path='/tmp/evil.sh'/>"
                               "</interface>"), "script_refused",
     "xml.devices.interface[1].script"),
    ("ethernet-downscript", domain("<interface type='ethernet'><downscript path='/tmp/x'/>"
                                   "</interface>"), "script_refused",
     "xml.devices.interface[1].downscript"),
    ("bridge-script", domain("<interface type='bridge'><source bridge='br0'/>"
                             "<script path='/tmp/evil.sh'/></interface>"),
     "script_refused", "xml.devices.interface[1].script"),
    ("ethernet-host-route", domain("<interface type='ethernet'>"
                                   "<route family='ipv4' address='0.0.0.0' prefix='0' "
                                   "gateway='192.168.1.1'/></interface>"),
     "interface_refused", "xml.devices.interface[1].route"),
    ("ethernet-host-address", domain("<interface type='ethernet'><ip address='10.1.1.1' "
                                     "prefix='24'/></interface>"),
     "interface_refused", "xml.devices.interface[1].ip"),
    ("nic-mcast", domain("<interface type='mcast'><source address='230.0.0.1' port='5558'/>"
                         "</interface>"), "interface_refused", "xml.devices.interface[1]"),
    ("nic-client", domain("<interface type='client'><source address='10.0.0.1' port='5558'/>"
                          "</interface>"), "interface_refused", "xml.devices.interface[1]"),
    ("nic-hostdev", domain("<interface type='hostdev'><source><address type='pci' "
                           "domain='0' bus='1' slot='0' function='0'/></source></interface>"),
     "hostdev_refused", "xml.devices.interface[1]"),
    ("nic-tap-file", domain("<interface type='bridge'><source bridge='br0'/>"
                            "<backend tap='/etc/shadow'/></interface>"),
     "path_not_allowed", "xml.devices.interface[1].backend"),
    ("nic-passt-log", domain("<interface type='user'><backend type='passt' "
                             "logFile='/etc/shadow'/></interface>"),
     "path_not_allowed", "xml.devices.interface[1].backend"),
    ("nic-vhostuser", domain("<interface type='vhostuser'><source type='unix' "
                             "path='/run/libvirt/libvirt-sock' mode='client'/></interface>"),
     "path_not_allowed", "xml.devices.interface[1].source"),
    ("option-rom", domain("<interface type='bridge'><source bridge='br0'/>"
                          "<rom file='/etc/shadow'/></interface>"),
     "path_not_allowed", "xml.devices.interface[1].rom"),
    # Host devices.
    ("hostdev", domain("<hostdev mode='subsystem' type='pci' managed='yes'><source>"
                       "<address domain='0' bus='0' slot='1' function='0'/></source></hostdev>"),
     "hostdev_refused", "xml.devices.hostdev[1]"),
    ("hostdev-storage", domain("<hostdev mode='capabilities' type='storage'><source>"
                               "<block>/dev/vda</block></source></hostdev>"),
     "hostdev_refused", "xml.devices.hostdev[1]"),
    ("redirdev", domain("<redirdev bus='usb' type='spicevmc'/>"), "hostdev_refused",
     "xml.devices.redirdev[1]"),
    ("smartcard-passthrough", domain("<smartcard mode='passthrough' type='spicevmc'/>"),
     "hostdev_refused", "xml.devices.smartcard[1]"),
    ("smartcard-host", domain("<smartcard mode='host'/>"), "hostdev_refused",
     "xml.devices.smartcard[1]"),
    ("shmem", domain("<shmem name='x'><model type='ivshmem-plain'/></shmem>"),
     "hostdev_refused", "xml.devices.shmem[1]"),
    ("input-passthrough", domain("<input type='passthrough' bus='virtio'>"
                                 "<source evdev='/dev/input/event0'/></input>"),
     "hostdev_refused", "xml.devices.input[1]"),
    ("input-evdev", domain("<input type='evdev'><source dev='/dev/input/event0'/></input>"),
     "hostdev_refused", "xml.devices.input[1]"),
    ("tpm-passthrough", domain("<tpm model='tpm-tis'><backend type='passthrough'>"
                               "<device path='/dev/tpm0'/></backend></tpm>"),
     "hostdev_refused", "xml.devices.tpm[1].backend"),
    ("host-audio", domain("<audio id='1' type='alsa'/>"), "hostdev_refused",
     "xml.devices.audio[1]"),
    ("scsi-lun", domain(disk("{ok}/a.img", "block", "dev", device="lun")), "hostdev_refused",
     "xml.devices.disk[1]"),
    ("rawio", domain(disk("{ok}/a.img").replace("device='disk'", "device='disk' rawio='yes'")),
     "hostdev_refused", "xml.devices.disk[1]"),
    ("nvme-disk", domain("<disk type='nvme' device='disk'><driver type='raw'/>"
                         "<source type='pci' managed='yes' namespace='1'><address domain='0' "
                         "bus='1' slot='0' function='0'/></source><target dev='vda'/></disk>"),
     "hostdev_refused", "xml.devices.disk[1]"),
    ("render-node", domain("<graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/>"
                           "</graphics>"), "hostdev_refused", "xml.devices.graphics[1].gl"),
    ("sdl-window", domain("<graphics type='sdl' display=':0' xauth='/root/.Xauthority'/>"),
     "hostdev_refused", "xml.devices.graphics[1]"),
    ("rng-hwrng", domain("<rng model='virtio'><backend model='random'>/dev/hwrng</backend>"
                         "</rng>"), "path_not_allowed", "xml.devices.rng[1].backend"),
    # Other host paths.
    ("graphics-socket", domain("<graphics type='vnc' socket='/etc/x.sock'/>"),
     "path_not_allowed", "xml.devices.graphics[1]"),
    ("nvdimm", domain("<memory model='nvdimm'><source><path>/dev/vda</path></source>"
                      "<target><size unit='MiB'>64</size></target></memory>"),
     "path_not_allowed", "xml.devices.memory[1].source.path"),
    ("pstore", domain("<pstore backend='acpi-erst'><path>/etc/shadow</path>"
                      "<size unit='KiB'>8</size></pstore>"),
     "path_not_allowed", "xml.devices.pstore[1].path"),
    ("lease", domain("<lease><lockspace>x</lockspace><key>y</key>"
                     "<target path='/etc/shadow'/></lease>"),
     "path_not_allowed", "xml.devices.lease[1].target"),
    ("tpm-external-socket", domain("<tpm model='tpm-crb'><backend type='external'>"
                                   "<source type='unix' mode='connect' path='/etc/x'/>"
                                   "</backend></tpm>"),
     "path_not_allowed", "xml.devices.tpm[1].backend.source"),
    ("unknown-device", domain("<teleporter/>"), "device_refused", "xml.devices.teleporter[1]"),
    # Security labels.
    ("seclabel-none", domain(top="<seclabel type='none'/>"), "seclabel_refused", "xml.seclabel"),
    ("seclabel-no-relabel", domain(top="<seclabel type='dynamic' relabel='no'/>"),
     "seclabel_refused", "xml.seclabel"),
    ("seclabel-static-root", domain(top="<seclabel type='static' model='dac' relabel='no'>"
                                        "<label>+0:+0</label></seclabel>"),
     "seclabel_refused", "xml.seclabel"),
    ("seclabel-model-none", domain(top="<seclabel model='none'/>"), "seclabel_refused",
     "xml.seclabel"),
    ("seclabel-baselabel", domain(top="<seclabel type='dynamic' model='selinux'>"
                                      "<baselabel>unconfined_t</baselabel></seclabel>"),
     "seclabel_refused", "xml.seclabel"),
    ("seclabel-second", domain(top="<seclabel type='dynamic' model='dac'/>"
                                   "<seclabel type='none' model='selinux'/>"),
     "seclabel_refused", "xml.seclabel[2]"),
    ("seclabel-on-a-disk", domain(disk("{ok}/a.img").replace(
        "<source file='{ok}/a.img'/>",
        "<source file='{ok}/a.img'><seclabel relabel='no'/></source>")),
     "seclabel_refused", "xml.devices.disk[1].source.seclabel"),
    # What ran host code before the policy existed.
    ("qemu-commandline", domain(top=f"<qemu:commandline xmlns:qemu='{QEMU_NS}'>"
                                    "<qemu:arg value='-set'/></qemu:commandline>"),
     "passthrough_refused", "xml.commandline"),
    ("qemu-override", domain(top=f"<qemu:override xmlns:qemu='{QEMU_NS}'>"
                                 "<qemu:device alias='x'/></qemu:override>"),
     "passthrough_refused", "xml.override"),
    ("emulator", domain("<emulator>/tmp/evil</emulator>"), "emulator_refused",
     "xml.devices.emulator[1]"),
    ("emulator-dotdot", domain("<emulator>/usr/bin/qemu-system-x86_64/../../../tmp/evil"
                               "</emulator>"), "emulator_refused", "xml.devices.emulator[1]"),
    ("domain-type", domain(kind="lxc"), "domain_type_refused", "xml"),
    # libvirt reads every <devices> and <os>, and the first <source> of a disk.
    ("second-devices", domain().replace("</devices>", "</devices><devices><hostdev "
                                         "mode='subsystem' type='usb'/></devices>"),
     "hostdev_refused", "xml.devices[2].hostdev[1]"),
    ("second-os", domain().replace("</os>", "</os><os><kernel>/etc/shadow</kernel></os>"),
     "path_not_allowed", "xml.os[2].kernel"),
    ("second-source", domain(disk("{ok}/a.img").replace(
        "<target", "<source protocol='nbd' name='x'/><target")),
     "network_disk_refused", "xml.devices.disk[1]"),
]


@pytest.mark.parametrize(("xml", "reason", "field"),
                         [pytest.param(x, r, f, id=i) for i, x, r, f in REFUSED])
def test_refused(xml: str, reason: str, field: str, dirs: dict[str, str]) -> None:
    error = denied(xml, dirs)
    assert (error.reason, error.details["field"]) == (reason, field), error.message
    assert error.message.startswith(f"{field}: ")
    assert error.to_error()["code"] == 7


#: (id, xml): each is allowed by the default policy.
ALLOWED: list[tuple[str, str]] = [
    ("allowed-dir", domain(disk("{ok}/a.img"))),
    ("storage-domain", domain(disk("{sd}/a.img"))),
    ("qcow2-with-chain", domain(disk("{sd}/a.img", fmt="qcow2", extra=(
        "<backingStore type='file'><format type='qcow2'/><source file='{sd}/a.img'/>"
        "<backingStore/></backingStore>")))),
    ("qcow2-alone", domain(disk("{ok}/a.img", fmt="qcow2", extra="<backingStore/>"))),
    ("empty-cdrom", domain("<disk type='file' device='cdrom'><target dev='sda' bus='sata'/>"
                           "</disk>")),
    ("symlink-inside", domain(disk("{ok}/inner-link"))),
    ("dotdot-inside", domain(disk("{ok}/../ok/a.img"))),
    ("kernel-initrd", domain(os_extra="<kernel>{ok}/a.img</kernel><initrd>{sd}/a.img</initrd>"
                                      "<cmdline>root=/dev/vda</cmdline>")),
    ("firmware", domain(os_extra="<loader readonly='yes' type='pflash'>{fw}/a.img</loader>"
                                 "<nvram template='{fw}/a.img'>{nv}/vm1_VARS.fd</nvram>")),
    ("firmware-autoselect", domain(os_extra="<loader secure='no'/>").replace(
        "<os>", "<os firmware='efi'>")),
    ("rom-loader", domain(os_extra="<loader type='rom'>{fw}/a.img</loader>")),
    ("option-rom", domain("<interface type='network'><source network='default'/>"
                          "<rom file='{fw}/a.img'/></interface>")),
    ("serial-pty-live", domain("<serial type='pty'><source path='/dev/pts/3'/>"
                               "<target port='0'/></serial><console type='pty' tty='/dev/pts/3'>"
                               "<source path='/dev/pts/3'/><target type='serial'/></console>")),
    ("serial-file-log", domain("<serial type='file'><source path='{ok}/console.log'/>"
                               "<log file='{ok}/serial.log'/></serial>")),
    ("serial-tcp-loopback", domain(SERIAL_TCP.format(mode="bind", host="127.0.0.1")
                                   + SERIAL_TCP.format(mode="bind", host="::1"))),
    ("guest-agent-channel", domain("<channel type='unix'><source mode='bind'/>"
                                   "<target type='virtio' name='org.qemu.guest_agent.0'/>"
                                   "</channel><channel type='spicevmc'>"
                                   "<target type='virtio' name='com.redhat.spice.0'/>"
                                   "</channel>")),
    ("readonly-share", domain("<filesystem type='mount' accessmode='mapped'>"
                              "<source dir='{ok}'/><target dir='/data'/><readonly/>"
                              "</filesystem>")),
    ("nics", domain("<interface type='bridge'><source bridge='br0'/><model type='virtio'/>"
                    "<backend tap='/dev/net/tun' vhost='/dev/vhost-net'/></interface>"
                    "<interface type='network'><source network='default'/></interface>"
                    "<interface type='ethernet'><target dev='tap7' managed='no'/></interface>"
                    "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>"
                    "<interface type='user'><ip family='ipv4' address='10.0.2.15' "
                    "prefix='24'/></interface>")),
    ("devices", domain("<emulator>/usr/bin/qemu-system-x86_64</emulator>"
                       "<controller type='usb' model='none'/><input type='tablet' bus='usb'/>"
                       "<graphics type='vnc' autoport='yes'><listen type='address' "
                       "address='127.0.0.1'/></graphics><video><model type='virtio'/></video>"
                       "<rng model='virtio'><backend model='random'>/dev/urandom</backend>"
                       "</rng><tpm model='tpm-crb'><backend type='emulator' version='2.0'/>"
                       "</tpm><memballoon model='virtio'/><watchdog model='i6300esb'/>"
                       "<audio id='1' type='none'/><sound model='ich9'/><vsock model='virtio'>"
                       "<cid auto='yes'/></vsock><panic model='isa'/>")),
    ("default-seclabel", domain(top="<seclabel type='dynamic' model='dac' relabel='yes'/>")),
    ("metadata-is-opaque", domain(top=f"<metadata><q:commandline xmlns:q='{QEMU_NS}'/>"
                                      "<x:y xmlns:x='urn:x' file='/etc/shadow'/></metadata>"
                                      "<description>/etc/shadow</description>")),
    ("test-driver", domain(kind="test")),
]


@pytest.mark.parametrize("xml", [pytest.param(x, id=i) for i, x in ALLOWED])
def test_allowed(xml: str, dirs: dict[str, str]) -> None:
    check(xml, dirs)


def test_paths_are_written_back_resolved(dirs: dict[str, str]) -> None:
    root = check(domain(disk("{ok}/inner-link") + disk("{ok}/../ok/a.img"),
                        os_extra="<kernel>{ok}/./a.img</kernel>"), dirs)
    sources = [s.get("file") for s in root.iterfind("devices/disk/source")]
    assert sources == [f"{dirs['sd']}/a.img", f"{dirs['ok']}/a.img"]
    assert root.findtext("os/kernel") == f"{dirs['ok']}/a.img"


@pytest.mark.parametrize(("xml", "field"), [
    (domain(disk("images/a.img")), "xml.devices.disk[1].source"),
    (domain(os_extra="<kernel> /etc/shadow</kernel>"), "xml.os.kernel"),
    (domain("<serial type='file'><source path='console.log'/></serial>"),
     "xml.devices.serial[1].source"),
])
def test_relative_paths_are_invalid(xml: str, field: str, dirs: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check(xml, dirs)
    assert (caught.value.reason, caught.value.details["field"]) == ("invalid_path", field)


# --- what the flags open ---------------------------------------------------------------------

HOST_DEVICES = [
    domain("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' "
           "bus='0' slot='1' function='0'/></source></hostdev>"),
    domain(disk("/dev/vda", "block", "dev", device="lun")),
    domain("<input type='evdev'><source dev='/dev/input/event0'/></input>"),
    domain("<serial type='dev'><source path='/dev/ttyS0'/></serial>"),
    domain("<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>"),
    domain("<graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics>"),
]


@pytest.mark.parametrize("xml", HOST_DEVICES)
def test_host_devices_when_allowed(xml: str, dirs: dict[str, str]) -> None:
    denied(xml, dirs)
    check(xml, dirs, allow_host_devices=True)


def test_allowed_host_devices_still_stay_in_dev(dirs: dict[str, str]) -> None:
    error = denied(domain(disk("/etc/shadow", "block", "dev", device="lun")), dirs,
                   allow_host_devices=True)
    assert error.reason == "path_not_allowed"
    # Host devices never widen what a plain file disk may name.
    error = denied(domain(disk("/dev/vda")), dirs, allow_host_devices=True)
    assert error.reason == "path_not_allowed"


def test_network_disks_when_allowed(dirs: dict[str, str]) -> None:
    xml = domain(disk("x", "network", "name").replace(
        "name='x'/>", "protocol='nbd' name='x'><host name='storage.example'/></source>"))
    assert denied(xml, dirs).reason == "network_disk_refused"
    check(xml, dirs, allow_network_disks=True)
    socket = xml.replace("<host name='storage.example'/>",
                         "<host transport='unix' socket='/run/libvirt/libvirt-sock'/>")
    assert denied(socket, dirs, allow_network_disks=True).reason == "path_not_allowed"


# --- typed specs and devices ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/shadow", "/dev/vda"])
def test_a_spec_disk_outside_the_allowed_dirs(path: str, dirs: dict[str, str]) -> None:
    root = etree.fromstring(domain_xml(
        check_spec({"name": "vm1", "disks": [{"path": path}]}, "kvm"), {}))
    with pytest.raises(PermissionDenied) as caught:
        check_domain(root, make_policy(dirs))
    assert caught.value.reason == "path_not_allowed"
    assert caught.value.details["field"] == "xml.devices.disk[1].source"


def test_a_full_spec_in_allowed_dirs_passes(dirs: dict[str, str]) -> None:
    ok, sd = dirs["ok"], dirs["sd"]
    spec = {"name": "web-1", "firmware": "uefi", "graphics": "vnc",
            "disks": [{"path": f"{sd}/a.img", "format": "qcow2", "boot_order": 1},
                      {"path": f"{ok}/a.img", "bus": "sata", "readonly": True}],
            "nics": [{"bridge": "br0"}, {"libvirt_network": "default"}],
            "kernel": f"{ok}/a.img", "initrd": f"{ok}/a.img", "cmdline": "console=ttyS0"}
    check_domain(etree.fromstring(domain_xml(check_spec(spec, "kvm"), {"labels": {}})),
                 make_policy(dirs))


def test_a_hotplugged_disk_is_named_by_its_prefix(dirs: dict[str, str]) -> None:
    spec = check_spec({"name": "vm1", "disks": [{"path": "/etc/shadow"}]}, "kvm")
    with pytest.raises(PermissionDenied) as caught:
        check_device(disk_element(spec.disks[0]), make_policy(dirs), "disk")
    assert caught.value.details["field"] == "disk.source"
    ok = check_spec({"name": "vm1", "disks": [{"path": f"{dirs['ok']}/a.img",
                                               "format": "qcow2"}]}, "kvm")
    check_device(disk_element(ok.disks[0]), make_policy(dirs), "disk")


# --- the policy itself ---------------------------------------------------------------------


def test_policy_resolves_its_directories(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    policy = Policy.of(VmConfig(allowed_paths=(str(tmp_path / "link"),), firmware_paths=(),
                                nvram_paths=()), [str(tmp_path / "sd")])
    assert policy.data_dirs == (str(real), str(tmp_path / "sd"))
    assert policy.allows(str(real / "x"), Use.DATA)
    assert not policy.allows(str(tmp_path / "realx"), Use.DATA)
    assert not policy.allows("/dev/vda", Use.DEVICE)


def test_a_storage_directory_behind_a_symlink_is_left_out(tmp_path: Path) -> None:
    # A posixfs domain's filesystem is whoever made it's: images -> / must not allow /.
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "images").symlink_to("/")
    (tmp_path / "good").mkdir()
    policy = Policy.of(VmConfig(), [str(tmp_path / "sd" / "images"), str(tmp_path / "good")])
    assert policy.data_dirs == (str(tmp_path / "good"),)


def test_device_nodes_are_not_files(dirs: dict[str, str]) -> None:
    policy = dataclasses.replace(make_policy(dirs, allow_host_devices=True),
                                 is_device=lambda path: path.endswith("a.img"))
    for xml in (domain(disk("{ok}/a.img")), domain(os_extra="<kernel>{sd}/a.img</kernel>")):
        with pytest.raises(PermissionDenied) as caught:
            check_domain(etree.fromstring(xml.format(**dirs)), policy)
        assert caught.value.reason == "path_not_allowed"
        assert "device node" in caught.value.message
    # A block disk is a device by nature.
    check_domain(etree.fromstring(domain(disk("{ok}/a.img", "block", "dev")).format(**dirs)),
                 policy)


def test_the_default_policy_allows_firmware_only(tmp_path: Path) -> None:
    policy = Policy.of(VmConfig())
    assert policy.data_dirs == ()
    assert policy.allows("/usr/share/OVMF/OVMF_CODE_4M.fd", Use.FIRMWARE)
    assert policy.allows("/var/lib/libvirt/qemu/nvram/vm1_VARS.fd", Use.NVRAM)
    assert not policy.allows("/usr/share/OVMF/OVMF_CODE_4M.fd", Use.DATA)
    assert not policy.allows("/var/lib/libvirt/qemu/nvram/vm1_VARS.fd", Use.DATA)

