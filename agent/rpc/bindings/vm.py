"""``VM.*``: lifecycle, live device changes, migration, and each VM's statistics."""

from __future__ import annotations

from virtnode.rpc.bindings import Bound, params, with_caller_role
from virtnode.stats.sampler import StatsService
from virtnode.vm.clones import CloneService
from virtnode.vm.console import ConsoleService
from virtnode.vm.devices import VmDeviceService
from virtnode.vm.migration import MigrationService
from virtnode.vm.ova import OvaService
from virtnode.vm.service import VmService
from virtnode.vm.snapshots import SnapshotService


def handlers(vms: VmService, devices: VmDeviceService, stats: StatsService,
             migrations: MigrationService) -> dict[str, Bound]:
    return {
        "VM.list": params(vms.list),
        "VM.create": params(vms.create),
        "VM.start": params(vms.start_vm),
        "VM.shutdown": params(vms.shutdown),
        "VM.reboot": params(vms.reboot),
        "VM.reset": params(vms.reset),
        "VM.pause": params(vms.pause),
        "VM.resume": params(vms.resume),
        "VM.destroy": params(vms.destroy),
        "VM.undefine": params(vms.undefine),
        "VM.getInfo": params(vms.get_info),
        "VM.getXML": params(vms.get_xml),
        "VM.freeze": params(vms.freeze),
        "VM.thaw": params(vms.thaw),
        "VM.getStats": params(stats.get_vm_stats),
        "VM.hotplugDisk": params(devices.hotplug_disk),
        "VM.changeMedia": params(devices.change_media),
        "VM.hotunplugDisk": params(devices.hotunplug_disk),
        "VM.hotplugNic": params(devices.hotplug_nic),
        "VM.hotunplugNic": params(devices.hotunplug_nic),
        "VM.setMemory": params(devices.set_memory),
        "VM.setVcpus": params(devices.set_vcpus),
        "VM.setTicket": params(devices.set_ticket),
        "VM.migrate": params(migrations.migrate),
    }


def snapshot_handlers(snapshots: SnapshotService) -> dict[str, Bound]:
    """``VM.*`` of snapshots."""
    return {
        "VM.snapshot": params(snapshots.snapshot),
        "VM.listSnapshots": params(snapshots.list_snapshots),
        "VM.getSnapshot": params(snapshots.get_snapshot),
        "VM.revertSnapshot": params(snapshots.revert),
        "VM.deleteSnapshot": params(snapshots.delete),
    }


def clone_handlers(clones: CloneService) -> dict[str, Bound]:
    """``VM.*`` of templates and clones."""
    return {
        "VM.makeTemplate": params(clones.make_template),
        "VM.clone": params(clones.clone),
    }


def export_handlers(ova: OvaService) -> dict[str, Bound]:
    """``VM.*`` of OVA files."""
    return {"VM.export": params(ova.export), "VM.import": params(ova.import_ova)}


def console_handlers(consoles: ConsoleService) -> dict[str, Bound]:
    """``VM.*`` of the consoles: tokens for console sessions, the serial log, screenshots."""
    return {
        "VM.openConsole": with_caller_role(consoles.open_console),
        "VM.getConsoleLog": params(consoles.get_console_log),
        "VM.screenshot": params(consoles.screenshot),
    }
