"""Task events to containerd: `Events/Forward` on the ttrpc socket containerd
names in TTRPC_ADDRESS, one envelope per event, in the order they happen.

containerd 1.6 resolves an event's type from the Any's type URL, which must
be the bare message name (`containerd.events.TaskExit`): Protos.pack_any.
Events are sent by one task from a queue, so that a slow containerd never
reorders them (TaskExit before TaskDelete, TaskStart before TaskExit).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import KataError
from . import ttrpc
from .protos import Protos

log = logging.getLogger("kata_py.shim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
QUEUE_LIMIT = 4096
SEND_TIMEOUT = 10.0


class Publisher:
    def __init__(self, protos: Protos, address: str | None, namespace: str) -> None:
        self.protos = protos
        self.address = address
        self.namespace = namespace
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        self.client: ttrpc.Client | None = None
        self.sender: asyncio.Task | None = None

    def publish(self, topic: str, kind: str, **fields) -> None:
        """Queue one event: `kind` names a message of api/events/task.proto."""
        message = getattr(self.protos.events, kind)()
        for key, value in fields.items():
            if value is None:
                continue
            if key == "exited_at":      # ns since the epoch (pod.Proc.exited_at)
                message.exited_at.FromNanoseconds(value)
            elif hasattr(value, "DESCRIPTOR"):
                getattr(message, key).CopyFrom(value)
            else:
                setattr(message, key, value)
        if self.sender is None:
            self.sender = asyncio.ensure_future(self._send_all())
        try:
            self.queue.put_nowait((time.time_ns(), topic, message))
        except asyncio.QueueFull:
            log.error("event queue full: %s dropped", topic)

    async def _send_all(self) -> None:
        while True:
            when, topic, message = await self.queue.get()
            try:
                await self._send(when, topic, message)
            except (KataError, OSError, asyncio.TimeoutError) as exc:
                log.warning("event %s not forwarded: %s", topic, exc)
            finally:
                self.queue.task_done()

    async def _send(self, when: int, topic: str, message) -> None:
        if not self.address:
            return
        for attempt in (1, 2):
            try:
                if self.client is None or self.client.closed:
                    self.client = await ttrpc.Client.connect(self.address.removeprefix("unix://"),
                                                             timeout=SEND_TIMEOUT)
                envelope = self.protos.events_service.Envelope(namespace=self.namespace, topic=topic,
                                                               event=self.protos.pack_any(message))
                envelope.timestamp.FromNanoseconds(when)
                request = self.protos.events_service.ForwardRequest(envelope=envelope)
                await self.client.call(SERVICE, "Forward", request, self.protos.message_class("google.protobuf.Empty"),
                                       namespace=self.namespace, timeout=SEND_TIMEOUT)
                return
            except ttrpc.ConnectionClosed:
                self.client = None
                if attempt == 2:
                    raise

    async def drain(self, timeout: float = 5.0) -> None:
        """Send what is queued (before the shim exits)."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d events not forwarded at exit", self.queue.qsize())
        if self.client is not None:
            await self.client.close()
