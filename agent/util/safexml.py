"""Safe XML parsing: no entities, no network, no huge trees."""

from __future__ import annotations

from lxml import etree

from virtnode.errors import InvalidArgument

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=True
)


def parse_xml(text: str | bytes, *, what: str = "XML") -> etree._Element:
    """Parse XML without expanding entities or fetching anything.

    Raises :class:`InvalidArgument` (reason ``bad_xml``) when it is not well-formed.
    """
    data = text.encode() if isinstance(text, str) else text
    try:
        return etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise InvalidArgument(f"{what} is not well-formed: {exc}", reason="bad_xml") from None
