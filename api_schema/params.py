"""The params of every API method as a TypedDict, generated from the YAML beside it.

Do not edit: ``make docs`` writes it (``python -m virtnode.rpc.typegen``).
"""

from typing import Any, Literal, NotRequired, TypedDict

from virtnode.util.jsontypes import JsonObject


ApiDescribeParams = TypedDict("ApiDescribeParams", {})


class EventsGetParams(TypedDict):
    since: NotRequired[int]
    epoch: NotRequired[str]
    topics: list[str]
    limit: int
    wait: float


class EventsSubscribeParams(TypedDict):
    topics: list[str]
    since: NotRequired[int]
    epoch: NotRequired[str]


class EventsUnsubscribeParams(TypedDict):
    subscription_id: str


HostGetCapabilitiesParams = TypedDict("HostGetCapabilitiesParams", {})


HostGetStatsParams = TypedDict("HostGetStatsParams", {})


class HostGetStatsHistoryParams(TypedDict):
    since: NotRequired[float]
    resolution: NotRequired[float]


HostPingParams = TypedDict("HostPingParams", {})


class JobCancelParams(TypedDict):
    job_id: str


class JobGetParams(TypedDict):
    job_id: str


class JobListParams(TypedDict):
    state: NotRequired[Literal["pending", "running", "succeeded", "failed", "cancelled"]]
    kind: NotRequired[str]
    target: NotRequired[str]


class JobWaitParams(TypedDict):
    job_id: str
    timeout: float


class MigrationFinishParams(TypedDict):
    migration_id: str
    outcome: Literal["succeeded", "failed", "cancelled"]


class MigrationPrepareParams(TypedDict):
    migration_id: str
    vm_id: str
    name: str
    xml: str
    memory_bytes: int
    source_host_uuid: str
    host: str
    persistent_xml: NotRequired[str]
    domains: NotRequired[JsonObject]
    storage: Literal["shared", "copy"]
    sd_id: NotRequired[str]
    disks: NotRequired[list[JsonObject]]
    offline: bool
    post_copy: bool


class NetworkConfirmParams(TypedDict):
    job_id: str


NetworkGetStateParams = TypedDict("NetworkGetStateParams", {})


NetworkListParams = TypedDict("NetworkListParams", {})


NetworkPersistParams = TypedDict("NetworkPersistParams", {})


class NetworkSetupParams(TypedDict):
    networks: JsonObject
    bonds: NotRequired[JsonObject]
    options: NotRequired[JsonObject]
    request_key: NotRequired[str]


class StorageDomainAttachParams(TypedDict):
    sd_id: str
    type: Literal["localfs", "posixfs"]
    path: NotRequired[str]
    mount: NotRequired[JsonObject]


class StorageDomainCreateParams(TypedDict):
    type: Literal["localfs", "posixfs"]
    name: str
    path: NotRequired[str]
    mount: NotRequired[JsonObject]
    block_size: int
    force: bool


class StorageDomainDeleteParams(TypedDict):
    sd_id: str
    force: bool


class StorageDomainDetachParams(TypedDict):
    sd_id: str


class StorageDomainGetInfoParams(TypedDict):
    sd_id: str


StorageDomainListParams = TypedDict("StorageDomainListParams", {})


class VmChangeMediaParams(TypedDict):
    vm_id: str
    drive: str
    media: JsonObject | None
    force: bool


class VmCloneParams(TypedDict):
    vm_id: str
    name: str
    linked: bool
    sd_id: NotRequired[str]
    cloud_init: NotRequired[JsonObject]
    request_key: NotRequired[str]


class VmCreateParams(TypedDict):
    spec: NotRequired[JsonObject]
    xml: NotRequired[str]
    persistent: bool
    start: bool


class VmDeleteSnapshotParams(TypedDict):
    vm_id: str
    snapshot_id: str
    request_key: NotRequired[str]


class VmDestroyParams(TypedDict):
    vm_id: str


class VmExportParams(TypedDict):
    vm_id: str
    path: str
    disk_format: Literal["qcow2", "vmdk"]
    request_key: NotRequired[str]


class VmFreezeParams(TypedDict):
    vm_id: str
    mountpoints: NotRequired[list[str]]
    timeout: float


class VmGetConsoleLogParams(TypedDict):
    vm_id: str
    format: Literal["base64", "text"]


class VmGetInfoParams(TypedDict):
    vm_id: str


class VmGetSnapshotParams(TypedDict):
    vm_id: str
    snapshot_id: str


class VmGetStatsParams(TypedDict):
    vm_ids: NotRequired[list[str]]


class VmGetXMLParams(TypedDict):
    vm_id: str
    inactive: bool


class VmHotplugDiskParams(TypedDict):
    vm_id: str
    disk: Any


class VmHotplugNicParams(TypedDict):
    vm_id: str
    nic: JsonObject


class VmHotunplugDiskParams(TypedDict):
    vm_id: str
    target: str
    timeout: float


class VmHotunplugNicParams(TypedDict):
    vm_id: str
    mac: str
    timeout: float


class VmImportParams(TypedDict):
    path: str
    sd_id: str
    name: NotRequired[str]
    network: NotRequired[JsonObject]
    request_key: NotRequired[str]


class VmListParams(TypedDict):
    state: NotRequired[Literal["defined", "starting", "running", "paused", "shutting_down", "shutoff", "crashed", "unknown"]]


class VmListSnapshotsParams(TypedDict):
    vm_id: str


class VmMakeTemplateParams(TypedDict):
    vm_id: str


class VmMigrateParams(TypedDict):
    vm_id: str
    destination: str
    mode: Literal["live", "offline"]
    storage: Literal["shared", "copy"]
    destination_sd_id: NotRequired[str]
    max_bandwidth_mibps: NotRequired[int]
    policy: NotRequired[Literal["minimal_downtime", "post_copy", "suspend_workload"] | JsonObject]
    timeout: NotRequired[float]
    request_key: NotRequired[str]


class VmOpenConsoleParams(TypedDict):
    vm_id: str
    kind: Literal["serial", "vnc"]
    takeover: Literal["keep", "fail", "disconnect"]


class VmPauseParams(TypedDict):
    vm_id: str


class VmRebootParams(TypedDict):
    vm_id: str
    method: Literal["default", "acpi", "agent"]


class VmResetParams(TypedDict):
    vm_id: str


class VmResumeParams(TypedDict):
    vm_id: str


class VmRevertSnapshotParams(TypedDict):
    vm_id: str
    snapshot_id: str


class VmScreenshotParams(TypedDict):
    vm_id: str


class VmSetMemoryParams(TypedDict):
    vm_id: str
    memory_mib: int


class VmSetTicketParams(TypedDict):
    vm_id: str
    protocol: Literal["vnc", "spice"]
    password: str
    expires_in: int


class VmSetVcpusParams(TypedDict):
    vm_id: str
    vcpus: int


VmShutdownParams = TypedDict("VmShutdownParams", {
    "vm_id": str,
    "timeout": float,
    "methods": list[Literal["agent", "acpi"]],
    "fallback": Literal["destroy", "none"],
    "async": bool,
    "request_key": NotRequired[str],
})


class VmSnapshotParams(TypedDict):
    vm_id: str
    name: str
    description: NotRequired[str]
    memory: bool
    disks: NotRequired[list[str]]
    quiesce: Literal["auto", "required", "off"]
    request_key: NotRequired[str]


class VmStartParams(TypedDict):
    vm_id: str


class VmThawParams(TypedDict):
    vm_id: str


class VmUndefineParams(TypedDict):
    vm_id: str
    force: bool


class VolumeCancelTransferParams(TypedDict):
    transfer_id: str


class VolumeCopyParams(TypedDict):
    src: JsonObject
    dst_sd: str
    dst_format: Literal["raw", "qcow2"]
    allocation: Literal["sparse", "preallocated"]
    collapse: bool
    shared: bool
    description: NotRequired[str]
    request_key: NotRequired[str]


class VolumeCreateParams(TypedDict):
    sd_id: str
    image_id: NotRequired[str]
    size: NotRequired[int]
    format: Literal["raw", "qcow2"]
    allocation: Literal["sparse", "preallocated"]
    parent: NotRequired[JsonObject]
    shared: bool
    description: str


class VolumeDeleteParams(TypedDict):
    sd_id: str
    image_id: str
    volume_id: str


class VolumeFinalizeTransferParams(TypedDict):
    transfer_id: str
    sha256: NotRequired[str]


class VolumeGetInfoParams(TypedDict):
    sd_id: str
    image_id: str
    volume_id: str


class VolumeImportParams(TypedDict):
    sd_id: str
    path: NotRequired[str]
    upload: NotRequired[JsonObject]
    format: Literal["auto", "raw", "qcow2", "vmdk", "vdi", "vhdx"]
    dst_format: Literal["raw", "qcow2"]
    allocation: Literal["sparse", "preallocated"]
    content: Literal["disk", "iso"]
    description: str
    request_key: NotRequired[str]


class VolumeListParams(TypedDict):
    sd_id: str
    image_id: NotRequired[str]
    content: NotRequired[Literal["disk", "iso", "memory"]]


class VolumeMergeParams(TypedDict):
    sd_id: str
    image_id: str
    volume_id: str
    request_key: NotRequired[str]


class VolumePrepareTransferParams(TypedDict):
    sd_id: str
    direction: Literal["upload", "download"]
    image_id: NotRequired[str]
    volume_id: NotRequired[str]
    size: NotRequired[int]
    format: NotRequired[Literal["raw", "qcow2"]]
    virtual_size: NotRequired[int]
    content: Literal["disk", "iso"]
    description: str


class VolumeResizeParams(TypedDict):
    sd_id: str
    image_id: str
    volume_id: str
    size: int
