"""The libvirt objects as the agent uses them: typed Protocols of ``virConnect`` and
``virDomain``.

libvirt-python ships no type information. These Protocols name every method the agent
calls, with the types libvirt-python gives and takes, so that code handed a connection or
a domain by :meth:`~virtnode.hypervisor.connection.Hypervisor.call` is checked like any
other. Only :mod:`virtnode.hypervisor.connection` imports libvirt itself; a method not
listed here is not called anywhere. Errors are libvirt's own (``libvirtError``), turned into
API errors by :func:`~virtnode.hypervisor.connection.translate_error` in one place.
"""

from __future__ import annotations

from typing import Any, Protocol

#: One domain's statistics from ``getAllDomainStats``/``domainListGetStats``: flat keys
#: (``vcpu.0.time``, ``block.1.rd.bytes``...) to numbers and strings.
DomainStats = dict[str, Any]


class Stream(Protocol):
    """A ``virStream``: bytes to and from a domain (its console, a screenshot).

    Opened non-blocking, ``recv`` answers -2 when nothing is there yet and ``send`` -2
    when nothing can be queued; both then leave the work to the stream's event callback.
    ``finish`` and ``abort`` wait for libvirtd's answer: pool threads only.
    """

    def recv(self, nbytes: int) -> bytes | int: ...

    def send(self, data: bytes) -> int: ...

    def finish(self) -> int: ...

    def abort(self) -> int: ...

    def eventAddCallback(self, events: int, cb: Any, opaque: Any) -> int: ...  # noqa: N802

    def eventUpdateCallback(self, events: int) -> int: ...  # noqa: N802

    def eventRemoveCallback(self) -> int: ...  # noqa: N802


class Domain(Protocol):
    """A ``virDomain``: one VM, defined or running."""

    def name(self) -> str: ...

    def UUIDString(self) -> str: ...  # noqa: N802 (libvirt's names)

    def XMLDesc(self, flags: int = 0) -> str: ...  # noqa: N802

    def isPersistent(self) -> int: ...  # noqa: N802

    def state(self, flags: int = 0) -> list[int]:
        """``[state, reason]``."""
        ...

    def info(self) -> list[int]:
        """``[state, max_kib, current_kib, vcpus, cpu_time_ns]``."""
        ...

    def controlInfo(self, flags: int = 0) -> list[int]:  # noqa: N802
        """``[state, details, state_time_ms]`` of the monitor connection."""
        ...

    def maxMemory(self) -> int: ...  # noqa: N802

    def create(self) -> int: ...

    def destroy(self) -> int: ...

    def undefineFlags(self, flags: int = 0) -> int: ...  # noqa: N802

    def suspend(self) -> int: ...

    def resume(self) -> int: ...

    def reset(self, flags: int = 0) -> int: ...

    def reboot(self, flags: int = 0) -> int: ...

    def shutdownFlags(self, flags: int = 0) -> int: ...  # noqa: N802

    def attachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802

    def detachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802

    def updateDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802

    def setMemoryFlags(self, memory: int, flags: int = 0) -> int: ...  # noqa: N802

    def setVcpusFlags(self, nvcpus: int, flags: int = 0) -> int: ...  # noqa: N802

    def setMetadata(self, type: int, metadata: str | None, key: str | None,  # noqa: N802
                    uri: str | None, flags: int = 0) -> int: ...

    def agentSetResponseTimeout(self, timeout: int, flags: int = 0) -> int: ...  # noqa: N802

    def snapshotCreateXML(self, xmlDesc: str, flags: int = 0) -> Any: ...  # noqa: N802, N803

    def blockCommit(self, disk: str, base: str | None, top: str | None,  # noqa: N802
                    bandwidth: int = 0, flags: int = 0) -> int: ...

    def blockJobInfo(self, path: str, flags: int = 0) -> dict[str, int]:  # noqa: N802
        """``{type, bandwidth, cur, end}`` of the disk's block job; empty without one."""
        ...

    def blockJobAbort(self, disk: str, flags: int = 0) -> int: ...  # noqa: N802

    def guestInfo(self, types: int = 0, flags: int = 0) -> dict[str, Any]:  # noqa: N802
        """What the guest agent reports, as typed parameters (``os.name``, ``fs.0.name``)."""
        ...

    def interfaceAddresses(self, source: int,  # noqa: N802
                           flags: int = 0) -> dict[str, dict[str, Any]]: ...

    def fsFreeze(self, mountpoints: list[str] | None = None,  # noqa: N802
                 flags: int = 0) -> int: ...

    def fsThaw(self, mountpoints: list[str] | None = None,  # noqa: N802
               flags: int = 0) -> int: ...

    def migrateToURI3(self, dconnuri: str, params: dict[str, Any],  # noqa: N802
                      flags: int = 0) -> int:
        """Migrate to the libvirtd at ``dconnuri`` (peer to peer); blocks until done."""
        ...

    def jobStats(self, flags: int = 0) -> dict[str, Any]:  # noqa: N802
        """The running job's figures (``type``, ``data_total``, ``data_processed``,
        ``data_remaining``, ``memory_iteration``, ``memory_dirty_rate``...)."""
        ...

    def abortJob(self) -> int: ...  # noqa: N802

    def migrateSetMaxDowntime(self, downtime: int, flags: int = 0) -> int: ...  # noqa: N802

    def migrateStartPostCopy(self, flags: int = 0) -> int: ...  # noqa: N802

    def migrateGetMaxDowntime(self, flags: int = 0) -> int: ...  # noqa: N802

    def isActive(self) -> int: ...  # noqa: N802

    def blockInfo(self, path: str, flags: int = 0) -> list[int]:  # noqa: N802
        """``[capacity, allocation, physical]`` of a disk, by target or path."""
        ...

    def openConsole(self, dev_name: str | None, st: Stream,  # noqa: N802
                    flags: int = 0) -> int: ...

    def openGraphics(self, idx: int, fd: int, flags: int = 0) -> int:  # noqa: N802
        """Hands ``fd`` (one end of a socket pair) to the ``idx``-th graphics device's
        server."""
        ...

    def screenshot(self, stream: Stream, screen: int, flags: int = 0) -> str:
        """Sends the screen to ``stream``; returns its MIME type."""
        ...


class Connection(Protocol):
    """A ``virConnect``: the hypervisor connection, used only on the hypervisor's thread."""

    def lookupByUUIDString(self, uuidstr: str) -> Domain: ...  # noqa: N802

    def lookupByName(self, name: str) -> Domain: ...  # noqa: N802

    def defineXMLFlags(self, xml: str, flags: int = 0) -> Domain: ...  # noqa: N802

    def createXML(self, xmlDesc: str, flags: int = 0) -> Domain: ...  # noqa: N802, N803

    def compareHypervisorCPU(self, emulator: str | None, arch: str | None,  # noqa: N802, PLR0917
                             machine: str | None, virttype: str | None, xmlCPU: str,  # noqa: N803
                             flags: int = 0) -> int: ...

    def listAllDomains(self, flags: int = 0) -> list[Domain]: ...  # noqa: N802

    def getAllDomainStats(self, stats: int = 0,  # noqa: N802
                          flags: int = 0) -> list[tuple[Domain, DomainStats]]: ...

    def domainListGetStats(self, doms: list[Domain], stats: int = 0,  # noqa: N802
                           flags: int = 0) -> list[tuple[Domain, DomainStats]]: ...

    def getCapabilities(self) -> str: ...  # noqa: N802

    def getInfo(self) -> list[Any]:  # noqa: N802
        """``[model, memory_mib, cpus, mhz, nodes, sockets, cores, threads]``."""
        ...

    def getURI(self) -> str: ...  # noqa: N802

    def getFreeMemory(self) -> int:  # noqa: N802
        """Bytes of memory free on the host."""
        ...

    def getType(self) -> str: ...  # noqa: N802

    def saveImageGetXMLDesc(self, file: str, flags: int = 0) -> str: ...  # noqa: N802

    def restoreFlags(self, frm: str, dxml: str | None = None,  # noqa: N802
                     flags: int = 0) -> int: ...

    def getVersion(self) -> int: ...  # noqa: N802

    def getLibVersion(self) -> int: ...  # noqa: N802

    def isAlive(self) -> int: ...  # noqa: N802

    def setKeepAlive(self, interval: int, count: int) -> int: ...  # noqa: N802

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int: ...  # noqa: N802

    def unregisterCloseCallback(self) -> int: ...  # noqa: N802

    def domainEventRegisterAny(self, dom: Domain | None, eventID: int,  # noqa: N802, N803
                               cb: Any, opaque: Any) -> int: ...

    def domainEventDeregisterAny(self, callbackID: int) -> int: ...  # noqa: N802, N803

    def newStream(self, flags: int = 0) -> Stream: ...  # noqa: N802

    def close(self) -> int: ...
