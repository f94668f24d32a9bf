"""libvirt constants the services use, spelled out.

Only :mod:`virtnode.hypervisor.connection` imports libvirt; the functions that services run through
``Hypervisor.call`` take their flags from here. The values are part of libvirt's stable
ABI, and a unit test compares each with the libvirt module.
"""

# Domain states (virDomainState) and the reasons the agent distinguishes.
DOMAIN_NOSTATE = 0
DOMAIN_RUNNING = 1
DOMAIN_BLOCKED = 2
DOMAIN_PAUSED = 3
DOMAIN_SHUTDOWN = 4
DOMAIN_SHUTOFF = 5
DOMAIN_CRASHED = 6
DOMAIN_PMSUSPENDED = 7
DOMAIN_PAUSED_STARTING_UP = 11
DOMAIN_SHUTOFF_UNKNOWN = 0
DOMAIN_SHUTOFF_CRASHED = 3

# Lifecycle events (virDomainEventType).
DOMAIN_EVENT_DEFINED = 0
DOMAIN_EVENT_UNDEFINED = 1
DOMAIN_EVENT_STARTED = 2
DOMAIN_EVENT_SUSPENDED = 3
DOMAIN_EVENT_RESUMED = 4
DOMAIN_EVENT_STOPPED = 5
DOMAIN_EVENT_SHUTDOWN = 6
DOMAIN_EVENT_PMSUSPENDED = 7
DOMAIN_EVENT_CRASHED = 8

# Errors.
ERR_NO_DOMAIN = 42
ERR_NO_SUPPORT = 3
ERR_INVALID_ARG = 8

# Flags.
DOMAIN_AFFECT_LIVE = 1
DOMAIN_AFFECT_CONFIG = 2
#: virDomainUpdateDeviceFlags: eject media even from a tray the guest has locked.
DOMAIN_DEVICE_MODIFY_FORCE = 4
DOMAIN_DEFINE_VALIDATE = 1
DOMAIN_START_VALIDATE = 16
DOMAIN_XML_SECURE = 1
DOMAIN_XML_INACTIVE = 2
DOMAIN_UNDEFINE_MANAGED_SAVE = 1
DOMAIN_UNDEFINE_SNAPSHOTS_METADATA = 2
DOMAIN_UNDEFINE_NVRAM = 4
DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 16
DOMAIN_SHUTDOWN_ACPI_POWER_BTN = 1
DOMAIN_SHUTDOWN_GUEST_AGENT = 2
# The guest agent (virConnectDomainEventAgentLifecycleState, virDomainInterfaceAddressesSource).
CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED = 1
CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED = 2
DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT = 1
DOMAIN_REBOOT_DEFAULT = 0
DOMAIN_METADATA_ELEMENT = 2
DOMAIN_VCPU_LIVE = 1
DOMAIN_VCPU_CONFIG = 2
DOMAIN_MEM_LIVE = 1
DOMAIN_MEM_CONFIG = 2
DOMAIN_STATS_STATE = 1

# Bulk statistics (virDomainStatsTypes, virConnectGetAllDomainStatsFlags).
DOMAIN_STATS_CPU_TOTAL = 2
DOMAIN_STATS_BALLOON = 4
DOMAIN_STATS_VCPU = 8
DOMAIN_STATS_INTERFACE = 16
DOMAIN_STATS_BLOCK = 32
CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE = 1
CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT = 1 << 29

# State of a domain's control interface (virDomainControlState).
DOMAIN_CONTROL_OCCUPIED = 2
DOMAIN_CONTROL_ERROR = 3

# virConnectListAllDomains filters.
CONNECT_LIST_DOMAINS_ACTIVE = 1

# Migration (virDomainMigrateFlags, typed parameters, errors).
MIGRATE_LIVE = 1
MIGRATE_PEER2PEER = 2
MIGRATE_PERSIST_DEST = 8
MIGRATE_UNDEFINE_SOURCE = 16
MIGRATE_UNSAFE = 512
MIGRATE_OFFLINE = 1024
MIGRATE_ABORT_ON_ERROR = 4096
MIGRATE_POSTCOPY = 32768
MIGRATE_NON_SHARED_DISK = 64
MIGRATE_PARAM_URI = "migrate_uri"
MIGRATE_PARAM_MIGRATE_DISKS = "migrate_disks"
MIGRATE_PARAM_BANDWIDTH = "bandwidth"
MIGRATE_PARAM_DEST_XML = "destination_xml"
MIGRATE_PARAM_PERSIST_XML = "persistent_xml"
DOMAIN_XML_MIGRATABLE = 8
CPU_COMPARE_INCOMPATIBLE = 0
ERR_OPERATION_ABORTED = 78


def has_error_code(exc: BaseException, *codes: int) -> bool:
    """Whether ``exc`` is a libvirt error with one of ``codes`` (``ERR_*``)."""
    code = getattr(exc, "get_error_code", None)
    return callable(code) and code() in codes
