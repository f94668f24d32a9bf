"""Cloud-init for new VMs: the ``cloud_init`` of a spec checked, and its NoCloud seed made.

The seed is what cloud-init's NoCloud data source reads: an ISO 9660 image with the
volume label ``cidata`` holding ``user-data``, ``meta-data`` and, when given,
``network-config`` (Rock Ridge and Joliet names, so a guest sees them as spelled). It is
built in memory with pycdlib: pure Python, no process to start and no temporary
directory to clean up, and the bytes go into a storage-domain volume the way any other
data does (written, flushed, then marked legal). xorriso or genisoimage would need both a
staging directory and a subprocess per VM, for a file of a few KiB.

Everything here is checked before anything is made (:func:`check_cloud_init`, called by
:func:`virtnode.vm.spec.check_spec`): YAML that does not parse, user data that
cloud-init would not take, and meta data or network config of the wrong shape are
``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtnode.errors import InvalidArgument
from virtnode.util.yamltext import YamlError, safe_dump, safe_load

#: The volume label NoCloud looks for.
LABEL = "cidata"
#: What user data may start with: cloud-config YAML or a script.
USER_DATA_KINDS = ("#cloud-config", "#!")
FIELD = "spec.cloud_init"



@dataclass(frozen=True)
class CloudInit:
    """A checked ``cloud_init``: the seed's files as text, and where its drive goes."""

    user_data: str
    meta_data: str
    network_config: str | None
    bus: str
    target: str


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", reason="invalid_cloud_init", field=field)


def _parse_yaml(text: str, field: str) -> Any:
    try:
        return safe_load(text)
    except YamlError as exc:
        raise _invalid(field, str(exc)) from None


def _dump(data: Mapping[str, Any]) -> str:
    return safe_dump(data)


def check_cloud_init(raw: Mapping[str, Any], name: str, vm_uuid: str, *, bus: str,
                     target: str) -> CloudInit:
    """Check a spec's ``cloud_init`` (already shaped by the schema).

    ``user_data`` is cloud-config (``#cloud-config`` then a YAML mapping) or a script
    (``#!``). ``meta_data`` gets ``instance-id`` (the VM's uuid) and ``local-hostname``
    (its name) unless it gives its own. ``network_config`` is version 1 or 2.
    """
    user_data = raw.get("user_data")
    if not isinstance(user_data, str):
        raise _invalid(f"{FIELD}.user_data", "is required")
    if not user_data.startswith(USER_DATA_KINDS):
        raise _invalid(f"{FIELD}.user_data", "must start with #cloud-config (YAML) or #! "
                                             "(a script)")
    if user_data.startswith("#cloud-config"):
        parsed = _parse_yaml(user_data, f"{FIELD}.user_data")
        if parsed is not None and not isinstance(parsed, dict):
            raise _invalid(f"{FIELD}.user_data", "cloud-config must be a YAML mapping")
    meta = {"instance-id": vm_uuid, "local-hostname": name, **(raw.get("meta_data") or {})}
    for key in ("instance-id", "local-hostname"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise _invalid(f"{FIELD}.meta_data.{key}", "must be a non-empty string")
    network = raw.get("network_config")
    if network is not None and network.get("version") not in (1, 2):
        raise _invalid(f"{FIELD}.network_config.version", "must be 1 or 2")
    return CloudInit(user_data=user_data, meta_data=_dump(meta),
                     network_config=None if network is None else _dump(network),
                     bus=bus, target=target)


def seed_image(cloud_init: CloudInit) -> bytes:
    """The NoCloud seed as the bytes of an ISO 9660 image labelled ``cidata``."""
    import pycdlib  # only a VM with cloud-init needs it: not imported at every start

    files = [("USERDATA.;1", "user-data", cloud_init.user_data),
             ("METADATA.;1", "meta-data", cloud_init.meta_data)]
    if cloud_init.network_config is not None:
        files.append(("NETWORKC.;1", "network-config", cloud_init.network_config))
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    try:
        for iso_name, name, text in files:
            data = text.encode()
            iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name,
                       joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()
