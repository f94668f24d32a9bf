"""An event as the bus numbers it, the journal stores it and subscribers receive it."""

from __future__ import annotations

from dataclasses import dataclass, field

from virtnode import jsonrpc
from virtnode.util.jsontypes import JsonObject


@dataclass(frozen=True, slots=True)
class Event:
    epoch: str
    seq: int
    topic: str
    time: float
    data: JsonObject
    #: ``data`` encoded once, for the journal and for every subscriber.
    data_json: str = field(default="", compare=False)
    #: The encoded ``event`` notification, built once for every subscriber.
    text: str = field(default="", compare=False)

    def to_params(self) -> JsonObject:
        """The ``params`` of the ``event`` notification that carries this event."""
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "topic": self.topic,
            "time": self.time,
            "data": self.data,
        }

    def notification_text(self) -> str:
        """The encoded ``event`` notification, the same text for every subscriber."""
        return self.text or notification_text(self.epoch, self.seq, self.topic, self.time,
                                              self.data_json or jsonrpc.encode(self.data))


def notification_text(epoch: str, seq: int, topic: str, when: float, data_json: str) -> str:
    head = jsonrpc.encode({"epoch": epoch, "seq": seq, "topic": topic, "time": when})
    return f'{{"jsonrpc":"2.0","method":"event","params":{head[:-1]},"data":{data_json}}}}}'
