"""A real Linux guest for tests of graceful shutdown and reboot on qemu:///system.

The guest is Debian's cloud kernel booted directly (no disk, no network) with a tiny
initramfs made of ``busybox-static``. Both packages are fetched with ``apt-get download``
and unpacked with ``dpkg-deb -x``; nothing needs to be installed on the host. The
initramfs is a gzipped newc cpio archive written here in Python.

Variants:

- ``acpi``: loads ``evdev.ko`` and ``button.ko`` and runs busybox ``acpid``, whose
  power-button handler calls ``poweroff -f``. ACPI shutdown (``virDomainShutdown``) turns
  the guest off; ``virDomainReboot`` without a guest agent is an ACPI power-button press
  with libvirt's "fake reboot" flag set, so when the guest powers off libvirt resets it and
  it boots again.
- ``noacpi``: the same guest without ``acpid``: the power button does nothing, so ACPI
  shutdown and reboot requests are ignored.
- ``writer``: the ``acpi`` guest that also loads the virtio block driver and keeps writing
  to and reading from its first virtio disk (``/dev/vda``, given with ``domain_xml(disk=)``)
  with ``dd``: real guest disk I/O for statistics tests.
- ``dirty``: the ``noacpi`` guest that keeps rewriting 16 MiB of random data in its tmpfs
  (``cat`` of one file over another, forever): memory a live migration must send again
  and again, for tests of convergence, cancel and post-copy.
- ``console``: the ``acpi`` guest with a root shell on its serial port (busybox ``getty``,
  started again when it exits; prompt ``guest# ``) and the drivers of a CD-ROM on a
  virtio-scsi controller (``/dev/sr0``) with the ISO 9660 filesystem, and ``findlabel``,
  which prints the device of an ISO image by its label: tests type commands into the
  serial console, mount media (``mount -t iso9660 $(findlabel cidata) /mnt``) and read
  the answers.
- ``agent``: the ``console`` guest running Debian's ``qemu-guest-agent`` (``qemu-ga`` with
  the shared libraries it needs, from the host or from their packages, and the dynamic
  loader) on the virtio-serial channel ``org.qemu.guest_agent.0`` (``domain_xml(
  agent_channel=True)``): without udev there is no ``/dev/virtio-ports/`` link, so the
  init script finds the port by its name in sysfs, starts ``qemu-ga`` on it (started again
  when it exits) and waits until it has the port open before it is ready. A domain
  without the channel still boots (the console says so). It also has the virtio disk
  driver and ext4 (which mounts ext2), and ``datadisk``, which waits for ``/dev/vda``,
  makes an ext2 filesystem on it if the disk is blank and mounts it at ``/data``: a
  filesystem to write to and for ``guest-fsfreeze-freeze`` to freeze. Nothing runs it at
  boot: tests type it on the serial console, so a guest without a disk boots too.

All print :data:`GUEST_READY` on the serial console once they are ready for the power
button (after a reboot it appears again). They need TCG (``<domain type='qemu'>``): a Linux
kernel hangs under KVM on the nested hosts the tests run on.

Images are built once per kernel package, busybox package (and for ``agent`` the
``qemu-guest-agent`` package) and recipe, into
``$VIRTNODE_TEST_CACHE`` (default ``/var/cache/virtnode-tests/guests``), and reused.
Builds go to a temporary directory and are renamed into place, so racing builders are
harmless. QEMU runs as an unprivileged user (``libvirt-qemu`` on Debian) and opens the
kernel and initramfs itself, so the cache is made world-readable and its directories
world-traversable (libvirt also chowns both files to that user while a guest runs and
restores the owner afterwards). The serial log file is opened by libvirtd and handed to
QEMU, but :func:`console_log_path` still picks a directory QEMU could write to itself.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

GUEST_READY = "VIRTNODE-GUEST-READY"
GUEST_POWEROFF = "VIRTNODE-GUEST-POWEROFF"
GUEST_BROKEN = "VIRTNODE-GUEST-BROKEN"  # the guest could not get ready: no GUEST_READY
VARIANTS = ("acpi", "noacpi", "writer", "dirty", "console", "agent")
DEFAULT_CACHE = Path("/var/cache/virtnode-tests/guests")
CACHE_ENV = "VIRTNODE_TEST_CACHE"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
#: The virtio-serial port name libvirt gives the guest agent's channel.
AGENT_CHANNEL = "org.qemu.guest_agent.0"
MEMORY_MIB = 256
# Bump when the initramfs layout changes: it is part of every image's cache key.
RECIPE = 2

# The modules busybox acpid needs, and the kernel options that may build them in instead.
_MODULES = {
    "drivers/input/evdev.ko": "CONFIG_INPUT_EVDEV",
    "drivers/acpi/button.ko": "CONFIG_ACPI_BUTTON",
}

_INIT = """#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ready=yes
for module in /lib/modules/*.ko; do
    [ -e "$module" ] || continue
    insmod "$module" || { echo "@BROKEN@: insmod $module failed"; ready=no; }
done
@ACPID@
if [ $ready = yes ]; then
    echo "@READY@ variant=@VARIANT@ uptime=$(cut -d' ' -f1 /proc/uptime)"
fi
while :; do sleep 3600; done
"""

# The virtio block driver and what it needs, in load order (they are modules in Debian's
# cloud kernel), with the kernel options that may build them in instead.
_DISK_MODULES = {
    "drivers/virtio/virtio_ring.ko": "CONFIG_VIRTIO",
    "drivers/virtio/virtio.ko": "CONFIG_VIRTIO",
    "drivers/virtio/virtio_pci_legacy_dev.ko": "CONFIG_VIRTIO_PCI_LIB_LEGACY",
    "drivers/virtio/virtio_pci_modern_dev.ko": "CONFIG_VIRTIO_PCI_LIB",
    "drivers/virtio/virtio_pci.ko": "CONFIG_VIRTIO_PCI",
    "drivers/block/virtio_blk.ko": "CONFIG_VIRTIO_BLK",
}

# What a CD-ROM on a virtio-scsi controller needs, in load order, with the kernel options
# that may build them in instead (Debian's cloud kernel has no AHCI driver: no SATA).
_MEDIA_MODULES = {
    "drivers/virtio/virtio_ring.ko": "CONFIG_VIRTIO",
    "drivers/virtio/virtio.ko": "CONFIG_VIRTIO",
    "drivers/virtio/virtio_pci_legacy_dev.ko": "CONFIG_VIRTIO_PCI_LIB_LEGACY",
    "drivers/virtio/virtio_pci_modern_dev.ko": "CONFIG_VIRTIO_PCI_LIB",
    "drivers/virtio/virtio_pci.ko": "CONFIG_VIRTIO_PCI",
    "drivers/scsi/scsi_common.ko": "CONFIG_SCSI_COMMON",
    "drivers/scsi/scsi_mod.ko": "CONFIG_SCSI",
    "drivers/scsi/virtio_scsi.ko": "CONFIG_SCSI_VIRTIO",
    "drivers/cdrom/cdrom.ko": "CONFIG_CDROM",
    "drivers/scsi/sr_mod.ko": "CONFIG_BLK_DEV_SR",
    "fs/isofs/isofs.ko": "CONFIG_ISO9660_FS",
}

# The agent guest's drivers in load order, with the kernel options that may build them in:
# the console guest's CD-ROM, then a virtio disk, the virtio-serial ports qemu-ga talks
# through, and ext4 with what it needs. ext4 mounts the ext2 that busybox's mke2fs makes
# (Debian builds no ext2 driver), and unlike vfat it can be frozen (FIFREEZE).
_AGENT_MODULES = {
    **_MEDIA_MODULES,
    "drivers/block/virtio_blk.ko": "CONFIG_VIRTIO_BLK",
    "drivers/char/virtio_console.ko": "CONFIG_VIRTIO_CONSOLE",
    "lib/crc16.ko": "CONFIG_CRC16",
    "fs/mbcache.ko": "CONFIG_FS_MBCACHE",
    "fs/jbd2/jbd2.ko": "CONFIG_JBD2",
    "fs/ext4/ext4.ko": "CONFIG_EXT4_FS",
}

# Where the guest agent's shared libraries and the dynamic loader go in the initramfs: the
# loader's default search path on Debian, no ld.so.cache needed.
_LIBRARY_DIR = "lib/x86_64-linux-gnu"

# A root shell on the serial port, started again whenever it exits: what a person types
# into the serial console reaches it, and its answers come back the same way.
# ``findlabel LABEL`` prints the device holding the ISO 9660 image labelled LABEL (what
# ``blkid -L`` does; this busybox has no blkid and its findfs knows no ISO 9660).
_SHELL = """cat > /bin/findlabel <<'END'
#!/bin/sh
for dev in /dev/sr* /dev/vd* /dev/sd*; do
    [ -b "$dev" ] || continue
    label=$(dd if="$dev" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')
    [ "$label" = "$1" ] && { echo "$dev"; exit 0; }
done
exit 1
END
chmod 755 /bin/findlabel
export PS1='guest# '
( while :; do setsid getty -n -l /bin/sh -L 115200 ttyS0 vt100; done ) &"""

# Write 4 MiB to the disk and read it back without the page cache, forever.
_WRITER = """n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
[ -b /dev/vda ] || { echo "@BROKEN@: no /dev/vda"; ready=no; }
( while :; do
    dd if=/dev/zero of=/dev/vda bs=65536 count=64 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/vda of=/dev/null bs=65536 count=64 2>/dev/null
    usleep 200000
  done ) &"""

# 16 MiB of random data, copied over and over: about 16 MiB of guest memory dirtied per
# copy. Zero pages would not do: a migration sends them as flags, not data.
_DIRTIER = """dd if=/dev/urandom of=/tmp/dirty.src bs=1048576 count=16 2>/dev/null
( while :; do cat /tmp/dirty.src > /tmp/dirty.dst; done ) &"""

# qemu-ga on the virtio-serial port libvirt names org.qemu.guest_agent.0. There is no udev
# for /dev/virtio-ports/ links: the port is found by its sysfs name (the driver learns the
# names from the device shortly after it loads, so wait a little, unless there is no
# virtio-serial device at all, virtio device id 3). qemu-ga runs in the foreground and is
# started again if it exits; the guest is ready once it holds the port open. Its state
# directory and pid file default to /var/run.
_GUEST_AGENT = """mkdir -p /var/run /etc/qemu
port=
n=0
while [ $n -lt 60 ]; do
    for dir in /sys/class/virtio-ports/vport*; do
        [ "$(cat "$dir/name" 2>/dev/null)" = @CHANNEL@ ] && port=${dir##*/}
    done
    [ -n "$port" ] && break
    grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null || break
    usleep 50000; n=$((n + 1))
done
if [ -z "$port" ]; then
    echo "no @CHANNEL@ channel: the guest agent does not run"
else
    [ -c /dev/$port ] || mknod /dev/$port c $(tr : ' ' < /sys/class/virtio-ports/$port/dev)
    ( while :; do
        qemu-ga -m virtio-serial -p /dev/$port -l /tmp/qemu-ga.log
        echo "qemu-ga exited with $?" >> /tmp/qemu-ga.log
        sleep 1
      done ) &
    n=0
    until ls -l /proc/$(pidof qemu-ga)/fd 2>/dev/null | grep -q "/dev/$port\\$"; do
        [ $n -lt 200 ] || { echo "@BROKEN@: qemu-ga did not open /dev/$port"; \\
            cat /tmp/qemu-ga.log; ready=no; break; }
        usleep 50000; n=$((n + 1))
    done
    [ $ready = yes ] && echo "qemu-ga runs on /dev/$port (@CHANNEL@)"
fi"""

# qemu-ga carries out guest-shutdown by running ``/sbin/shutdown -h -P +0 MESSAGE`` (``-r``
# for a reboot), which busybox does not have: this one powers off as the power button does.
_SHUTDOWN = f"""cat > /sbin/shutdown <<'END'
#!/bin/sh
case " $* " in *" -r "*) exec reboot -f;; esac
echo "{GUEST_POWEROFF}" > /dev/console
exec poweroff -f
END
chmod 755 /sbin/shutdown"""

# ``datadisk``: wait for /dev/vda, make an ext2 filesystem on it if it is blank (zeros in
# its first 64 KiB) and mount it at /data. A disk with an ext2/3/4 superblock (magic
# 0xEF53 at byte 1080) is mounted as it is; anything else is left alone.
_DATADISK = """cat > /bin/datadisk <<'END'
#!/bin/sh
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
[ -b /dev/vda ] || { echo "datadisk: no /dev/vda" >&2; exit 1; }
magic=$(dd if=/dev/vda bs=2 skip=540 count=1 2>/dev/null | hexdump -e '1/2 "%04x"')
if [ "$magic" != ef53 ]; then
    if [ "$(dd if=/dev/vda bs=65536 count=1 2>/dev/null | tr -d '\\000' | wc -c)" != 0 ]; then
        echo "datadisk: /dev/vda holds data that is no ext2/3/4 filesystem" >&2
        exit 1
    fi
    mke2fs -L data /dev/vda >/dev/null || exit 1
fi
mkdir -p /data
mount -t ext4 /dev/vda /data
END
chmod 755 /bin/datadisk"""

# acpid writes its pid file only after it has opened every /dev/input/event*: waiting for
# it means a power-button press right after the ready marker is not lost.
_ACPID = """acpid -d -c /etc/acpi -p /run/acpid.pid &
n=0
while [ ! -s /run/acpid.pid ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
[ -s /run/acpid.pid ] || { echo "@BROKEN@: acpid did not start"; ready=no; }"""

# busybox acpid maps KEY_POWER to the action "PWRF/00000080", run relative to its
# configuration directory.
_POWER_BUTTON = f"""#!/bin/sh
echo "{GUEST_POWEROFF}" > /dev/console
exec poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs for direct kernel boot."""

    variant: str
    kernel: Path
    initrd: Path
    kernel_release: str
    kernel_deb: str
    busybox_deb: str
    agent_deb: str | None = None  # the qemu-guest-agent package, in the agent variant only


@dataclass(frozen=True)
class _Plan:
    """The packages an image is built from, as apt resolves them now."""

    kernel_package: str
    kernel_version: str
    busybox_version: str
    agent_version: str

    @property
    def kernel_release(self) -> str:
        return self.kernel_package.removeprefix("linux-image-")

    @property
    def kernel_deb(self) -> str:
        return _deb_name(self.kernel_package, self.kernel_version)

    @property
    def busybox_deb(self) -> str:
        return _deb_name(BUSYBOX_PACKAGE, self.busybox_version)

    @property
    def agent_deb(self) -> str:
        return _deb_name(AGENT_PACKAGE, self.agent_version)

    def key(self, variant: str) -> str:
        parts = [str(RECIPE), self.kernel_deb, self.busybox_deb, _init_script(variant),
                 _POWER_BUTTON]
        if variant == "agent":
            # Only the agent guest has qemu-ga: the other variants' keys stay as they were.
            parts.append(self.agent_deb)
        recipe = "\0".join(parts)
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
        return f"{self.kernel_release}-{variant}-{digest}"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


async def guest_image(variant: str, cache: Path | None = None) -> GuestImage:
    """The kernel and initramfs of ``variant``, built into the cache on first use.

    Blocking work (apt, dpkg-deb, compression) runs in a thread.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown guest variant {variant!r}; expected one of {VARIANTS}")
    return await asyncio.to_thread(_guest_image, variant, cache or cache_root())


def console_log_path(name: str, cache: Path | None = None) -> Path:
    """Where a guest's serial console log can go: a directory QEMU can write to."""
    directory = (cache or cache_root()) / "consoles"
    _mkdir_public(directory)
    return directory / f"{name}.log"


def domain_xml(image: GuestImage, name: str, uuid: str, console_log: Path,
               cmdline: str = "", *, disk: Path | None = None,
               memory_mib: int = MEMORY_MIB, agent_channel: bool = False,
               serial_socket: Path | None = None) -> str:
    """A TCG domain booting ``image`` directly, its serial console written to a file.

    1 vCPU, ``memory_mib`` (256 MiB), ACPI, no network, no disk unless ``disk`` (a raw
    image, attached as virtio ``vda``); a guest reboot restarts it. ``agent_channel``
    adds the guest agent's virtio-serial channel (libvirt picks the host socket).
    ``serial_socket`` makes the serial port a unix socket listening there, for typing
    into the guest, and still logs its output to ``console_log``.
    """
    args = " ".join(filter(None, ("console=ttyS0", cmdline)))
    disk_xml = "" if disk is None else f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
    channel_xml = "" if not agent_channel else f"""
    <channel type='unix'>
      <target type='virtio' name={quoteattr(AGENT_CHANNEL)}/>
    </channel>"""
    serial_xml = f"""
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>""" if serial_socket is None else f"""
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(serial_socket))}/>
      <log file={quoteattr(str(console_log))} append='off'/>
      <target port='0'/>
    </serial>"""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{escape(uuid)}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(args)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}{serial_xml}{channel_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def count_marker(path: Path, marker: str = GUEST_READY) -> int:
    """How many times ``marker`` is in the console log so far (0 if there is none yet)."""
    return _read(path).count(marker.encode())


async def wait_for_console(path: Path, marker: str = GUEST_READY, timeout: float = 60.0,
                           count: int = 1) -> int:
    """Wait until ``marker`` is in the console log at least ``count`` times.

    Returns the number of occurrences. Raises TimeoutError with the log's tail after
    ``timeout`` seconds, and RuntimeError at once if the guest reports it is broken.
    """
    deadline = time.monotonic() + timeout
    while True:
        data = await asyncio.to_thread(_read, path)
        seen = data.count(marker.encode())
        if seen >= count:
            return seen
        if GUEST_BROKEN.encode() in data:
            raise RuntimeError(f"the guest failed to start; console ends with:\n"
                               f"{console_tail(path)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{marker!r} seen {seen} times in {path}, wanted {count}, "
                f"after {timeout} s; console ends with:\n{console_tail(path)}"
            )
        await asyncio.sleep(0.05)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def console_tail(path: Path, size: int = 3000) -> str:
    """The end of a console log, for failure messages."""
    data = _read(path)
    return data[-size:].decode(errors="replace") if data else "(no console log)"


# Building -------------------------------------------------------------------------------


def _guest_image(variant: str, cache: Path) -> GuestImage:
    _mkdir_public(cache)
    plan = _resolve()
    final = cache / plan.key(variant)
    if not (final / "initrd.gz").exists():
        _build(plan, cache)
    return _image(plan, variant, final)


def _image(plan: _Plan, variant: str, directory: Path) -> GuestImage:
    return GuestImage(
        variant=variant,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.gz",
        kernel_release=plan.kernel_release,
        kernel_deb=plan.kernel_deb,
        busybox_deb=plan.busybox_deb,
        agent_deb=plan.agent_deb if variant == "agent" else None,
    )


def _run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


def _apt_update() -> None:
    _run("apt-get", "update", "-q")


@functools.cache
def _resolve() -> _Plan:
    """Which kernel, busybox and guest agent packages apt would fetch now (no download).

    Resolved once per process: it costs about a second (apt loads its package lists).
    """
    try:
        return _resolve_once()
    except RuntimeError:
        # No or stale package lists: refresh them once.
        _apt_update()
        return _resolve_once()


def _resolve_once() -> _Plan:
    fields = _apt_show(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE)
    meta, busybox = fields.get(KERNEL_META_PACKAGE), fields.get(BUSYBOX_PACKAGE)
    agent = fields.get(AGENT_PACKAGE)
    if meta is None or busybox is None or agent is None:
        raise RuntimeError(f"apt knows no {KERNEL_META_PACKAGE}, {BUSYBOX_PACKAGE} or "
                           f"{AGENT_PACKAGE}: {sorted(fields)}")
    # Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
    found = re.search(r"(linux-image-[\w.+-]+-cloud-amd64)(?:\s*\(=\s*([^)\s]+)\))?",
                      meta.get("Depends", ""))
    if found is None:
        raise RuntimeError(f"{KERNEL_META_PACKAGE} depends on no kernel: {meta}")
    return _Plan(found[1], found[2] or meta["Version"], busybox["Version"], agent["Version"])


def _apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """The fields of the version apt would install of each package, by package name."""
    out = _run("apt-cache", "show", "--no-all-versions", *packages)
    fields: dict[str, dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        parsed = dict(re.findall(r"^([\w-]+): ?(.*)$", stanza, re.MULTILINE))
        if "Package" in parsed:
            fields.setdefault(parsed["Package"], parsed)
    return fields


def _deb_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def _fetch_deb(package: str, version: str, debs: Path, work: Path) -> Path:
    """The .deb of ``package`` at ``version``, from the cache or downloaded into it."""
    target = debs / _deb_name(package, version)
    if target.exists():
        return target
    download = Path(tempfile.mkdtemp(prefix="download-", dir=work))
    try:
        _run("apt-get", "download", f"{package}={version}", cwd=download)
    except RuntimeError:
        # The lists may name a version the mirror no longer has.
        _apt_update()
        _run("apt-get", "download", f"{package}={version}", cwd=download)
    got = sorted(download.glob("*.deb"))
    if len(got) != 1:
        raise RuntimeError(f"apt-get download {package}={version} left {got} in {download}")
    _mkdir_public(debs)
    got[0].chmod(0o644)
    # Another builder may have put the same file there meanwhile: replacing it is harmless.
    os.replace(got[0], target)
    return target


def _build(plan: _Plan, cache: Path) -> None:
    """Build every variant of ``plan`` that the cache lacks."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        debs = cache / "debs"
        kernel_deb = _fetch_deb(plan.kernel_package, plan.kernel_version, debs, work)
        busybox_deb = _fetch_deb(BUSYBOX_PACKAGE, plan.busybox_version, debs, work)
        _run("dpkg-deb", "-x", str(kernel_deb), str(work / "kernel"))
        _run("dpkg-deb", "-x", str(busybox_deb), str(work / "busybox"))
        release = plan.kernel_release
        vmlinuz = work / "kernel" / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.is_file():
            raise RuntimeError(f"{plan.kernel_deb} has no boot/vmlinuz-{release}")
        vmlinuz = shutil.copyfile(vmlinuz, work / "vmlinuz")
        modules = _modules(work / "kernel", release, _MODULES)
        extra_modules = {
            "writer": _modules(work / "kernel", release, _DISK_MODULES),
            "console": _modules(work / "kernel", release, _MEDIA_MODULES),
            "agent": _modules(work / "kernel", release, _AGENT_MODULES),
        }
        busybox = (work / "busybox" / "bin" / "busybox").read_bytes()
        for variant in VARIANTS:
            final = cache / plan.key(variant)
            if (final / "initrd.gz").exists():
                continue
            out = work / variant
            out.mkdir()
            # One copy of the kernel per build, linked into each variant.
            os.link(vmlinuz, out / "vmlinuz")
            extra = extra_modules.get(variant, {})
            # The guest agent is fetched only when an agent image is built.
            files = _guest_agent(plan, debs, work) if variant == "agent" else {}
            (out / "initrd.gz").write_bytes(
                _initramfs(variant, busybox, {**modules, **extra}, files))
            about: dict[str, object] = {
                "variant": variant,
                "kernel_release": release,
                "kernel_deb": plan.kernel_deb,
                "busybox_deb": plan.busybox_deb,
                "recipe": RECIPE,
            }
            if variant == "agent":
                about["agent_deb"] = plan.agent_deb
                about["agent_files"] = {
                    name: str(source.relative_to(work)) if source.is_relative_to(work)
                    else str(source) for name, source in files.items()}
            (out / "image.json").write_text(json.dumps(about, indent=2) + "\n")
            for path in out.iterdir():
                path.chmod(0o644)
            out.chmod(0o755)
            try:
                out.rename(final)
            except OSError:
                # Another builder got there first with the same content.
                if not (final / "initrd.gz").exists():
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unpack(deb: Path, work: Path) -> Path:
    """Where ``deb`` is unpacked to under ``work``: a directory named after it."""
    tree = work / "unpacked" / deb.name
    tree.mkdir(parents=True)
    _run("dpkg-deb", "-x", str(deb), str(tree))
    return tree


def _guest_agent(plan: _Plan, debs: Path, work: Path) -> dict[str, Path]:
    """qemu-ga, its shared libraries and the dynamic loader: initramfs path -> real file.

    The libraries go under :data:`_LIBRARY_DIR` by the soname the binary asks for (the
    file a soname link points to is copied, not the link), the loader at the path the
    binary names (``/lib64/ld-linux-x86-64.so.2``).
    """
    tree = _unpack(_fetch_deb(AGENT_PACKAGE, plan.agent_version, debs, work), work)
    found = [tree / d / "qemu-ga" for d in ("usr/bin", "usr/sbin")]
    binary = next((path for path in found if path.is_file()), None)
    if binary is None:
        raise RuntimeError(f"{plan.agent_deb} has no usr/bin/qemu-ga or usr/sbin/qemu-ga")
    libraries, loader = _shared_libraries(binary, debs, work)
    files = {str(binary.relative_to(tree)): binary}
    files.update((f"{_LIBRARY_DIR}/{soname}", path) for soname, path in libraries.items())
    files[str(loader).lstrip("/")] = loader
    return {name: path.resolve(strict=True) for name, path in files.items()}


def _shared_libraries(binary: Path, debs: Path, work: Path) -> tuple[dict[str, Path], Path]:
    """The shared libraries ``binary`` needs, directly or not (soname -> file), and its loader.

    ldd resolves them on the host, which runs the guest's Debian release. Libraries the
    host lacks (a host without QEMU may have no libnuma1 or liburing2) come from their
    packages instead: those among what the guest agent's package depends on, directly or
    not, that are not installed here, fetched and unpacked like the others.
    """
    libraries, missing, loader = _ldd(binary, [])
    if missing:
        directories = []
        for package, version in _uninstalled_dependencies(AGENT_PACKAGE):
            tree = _unpack(_fetch_deb(package, version, debs, work), work)
            directories += [tree / "lib" / "x86_64-linux-gnu",
                            tree / "usr" / "lib" / "x86_64-linux-gnu"]
        libraries, missing, loader = _ldd(binary, [d for d in directories if d.is_dir()])
    if missing:
        raise RuntimeError(f"qemu-ga needs {', '.join(sorted(missing))}, which neither this "
                           f"host nor the packages {AGENT_PACKAGE} depends on provide")
    if loader is None:
        raise RuntimeError(f"ldd names no dynamic loader for {binary}")
    return libraries, loader


def _ldd(binary: Path, library_path: list[Path]
         ) -> tuple[dict[str, Path], set[str], Path | None]:
    """What ldd finds for ``binary``: soname -> file, the sonames not found, the loader."""
    env = None
    if library_path:
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(map(str, library_path))}
    out = _run("ldd", str(binary), env=env)
    libraries: dict[str, Path] = {}
    missing: set[str] = set()
    loader = None
    for line in out.splitlines():
        # "\tlibnuma.so.1 => /lib/x86_64-linux-gnu/libnuma.so.1 (0x...)", "... => not found",
        # "\t/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO ("linux-vdso.so.1") is no file.
        if (found := re.match(r"\s*(\S+) => (/\S+) \(0x", line)) is not None:
            libraries[found[1]] = Path(found[2])
        elif (found := re.match(r"\s*(\S+) => not found", line)) is not None:
            missing.add(found[1])
        elif (found := re.match(r"\s*(/\S+) \(0x", line)) is not None:
            loader = Path(found[1])
    return libraries, missing, loader


def _uninstalled_dependencies(package: str) -> list[tuple[str, str]]:
    """The packages ``package`` depends on, directly or not, that are not installed here,
    with the versions apt would install."""
    out = _run("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
               "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
               "--no-pre-depends", package)
    # Package names start their lines; "<name>" is a virtual package, ":i386" another arch.
    names = [line for line in out.splitlines()
             if re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line) and line != package]
    if not names:
        return []
    query = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\n",
                            *names], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=60, check=False)
    installed = {name for name, _, status in
                 (line.partition("\t") for line in query.stdout.splitlines())
                 if status == "installed"}
    absent = [name for name in names if name not in installed]
    if not absent:
        return []
    fields = _apt_show(*absent)
    return [(name, fields[name]["Version"]) for name in absent if name in fields]


def _modules(tree: Path, release: str, wanted: dict[str, str]) -> dict[str, bytes]:
    """The ``wanted`` modules by file name; none for those built into the kernel.

    The init script loads modules in the order of their names: names after the first
    of a set get a numbered prefix so that a set loads in its given order.
    """
    config = (tree / "boot" / f"config-{release}").read_text()
    modules = {}
    for i, (relative, option) in enumerate(wanted.items()):
        if re.search(rf"^{option}=y$", config, re.MULTILINE):
            continue
        prefix = f"z{i:02d}-" if len(wanted) > 2 else ""
        modules[prefix + Path(relative).name] = _module(tree, release, relative)
    return modules


def _module(tree: Path, release: str, relative: str) -> bytes:
    """A kernel module's bytes, decompressed if the package ships it compressed."""
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        path = base / release / "kernel" / relative
        if path.is_file():
            return path.read_bytes()
        if path.with_name(path.name + ".xz").is_file():
            return lzma.decompress(path.with_name(path.name + ".xz").read_bytes())
        if path.with_name(path.name + ".gz").is_file():
            return gzip.decompress(path.with_name(path.name + ".gz").read_bytes())
        if path.with_name(path.name + ".zst").is_file():
            return _unzstd(path.with_name(path.name + ".zst"))
    raise RuntimeError(f"the kernel package has no {relative} for {release}")


def _unzstd(path: Path) -> bytes:
    if shutil.which("zstd") is None:
        raise RuntimeError(f"{path.name} is zstd-compressed: install the zstd package")
    return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout


def _init_script(variant: str) -> str:
    acpid = (_ACPID if variant in ("acpi", "writer", "console", "agent")
             else "# no acpid: the power button is ignored")
    if variant == "writer":
        acpid += "\n" + _WRITER
    if variant == "dirty":
        acpid += "\n" + _DIRTIER
    if variant == "console":
        acpid += "\n" + _SHELL
    if variant == "agent":
        acpid += "\n" + "\n".join((_SHUTDOWN, _GUEST_AGENT, _DATADISK, _SHELL))
    return (_INIT.replace("@ACPID@", acpid).replace("@READY@", GUEST_READY)
            .replace("@BROKEN@", GUEST_BROKEN).replace("@VARIANT@", variant)
            .replace("@CHANNEL@", AGENT_CHANNEL))


def _initramfs(variant: str, busybox: bytes, modules: dict[str, bytes],
               files: dict[str, Path] | None = None) -> bytes:
    """The gzipped initramfs; ``files`` (initramfs path -> file) are added executable."""
    archive = _Cpio()
    directories = ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp",
                   "sbin", "usr", "usr/bin", "usr/sbin", "root"]
    for name in sorted(files or {}):
        # The kernel makes no missing parent directories: each comes before its files.
        for parent in reversed(Path(name).parents[:-1]):
            if str(parent) not in directories:
                directories.append(str(parent))
    for directory in directories:
        archive.directory(directory)
    archive.device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox, 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", _init_script(variant).encode(), 0o755)
    for name, data in sorted(modules.items()):
        archive.file(f"lib/modules/{name}", data, 0o644)
    for name, path in sorted((files or {}).items()):
        archive.file(name, path.read_bytes(), 0o755)
    if variant in ("acpi", "writer", "console", "agent"):
        archive.directory("etc/acpi")
        archive.directory("etc/acpi/PWRF")
        archive.file("etc/acpi/PWRF/00000080", _POWER_BUTTON.encode(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


class _Cpio:
    """A newc ("070701") cpio archive, the format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1, ino=0)
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), ino: int | None = None) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


def _mkdir_public(path: Path) -> None:
    """Create ``path`` (and parents) traversable by QEMU's unprivileged user."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        created.chmod(0o755)
