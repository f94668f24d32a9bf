"""The spelled-out libvirt constants equal libvirt's own."""

from __future__ import annotations

import libvirt
import pytest

from virtnode.hypervisor import constants as virconst

NAMES = sorted(name for name in vars(virconst) if name.isupper() and not name.startswith("_"))


def test_the_module_spells_out_constants() -> None:
    assert len(NAMES) >= 40
    assert {"DOMAIN_RUNNING", "DOMAIN_EVENT_STOPPED", "ERR_NO_DOMAIN"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_constant_equals_libvirt(name: str) -> None:
    value = getattr(virconst, name)
    # numbers, and the names of typed parameters
    assert type(value) in (int, str), f"{name} is neither an int nor a str"
    assert hasattr(libvirt, f"VIR_{name}"), f"libvirt has no VIR_{name}"
    assert value == getattr(libvirt, f"VIR_{name}")
