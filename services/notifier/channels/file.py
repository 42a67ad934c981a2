"""The demo channel: one JSON line per message appended to a file, fsync'd.

It stands in for SMS and e-mail in the demo (it takes a message planned for any channel), and is
idempotent on ``message_id``: a message already in the file is not written again, whether it was
written by this process or another (the file is locked while it is checked and appended to).

The file is the delivery itself (the demo's "phone"), so it holds the full address; logs do not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
from pathlib import Path
from typing import Any

import msgspec
import structlog

from services.notifier.channels.base import DeliveryResult, OutboundMessage, Outcome, mask_address

log = structlog.get_logger("duban.notifier.channels.file")

_line_decoder = msgspec.json.Decoder(dict[str, Any])


class FileChannel:
    kind = "file"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: set[str] = set()
        self._offset = 0  # how far the file has been read into _seen
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"FileChannel({str(self.path)!r})"

    async def send(self, message: OutboundMessage) -> DeliveryResult:
        async with self._lock:
            try:
                written = await asyncio.to_thread(self._append, message)
            except OSError as exc:
                result = DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=f"cannot write: {exc.strerror}")
            else:
                result = DeliveryResult(
                    outcome=Outcome.SENT,
                    provider_message_id=message.message_id,
                    detail="written" if written else "already in the file",
                )
        log.info(
            "notifier.channel.attempt",
            channel=self.kind,
            planned_channel=message.channel,
            message_id=message.message_id,
            to=mask_address(message.address),
            outcome=result.outcome.value,
            detail=result.detail,
        )
        return result

    def _append(self, message: OutboundMessage) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._catch_up(fd)
            if message.message_id in self._seen:
                return False
            record = msgspec.structs.asdict(message) | {
                "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            }
            line = msgspec.json.encode(record) + b"\n"
            os.write(fd, line)
            os.fsync(fd)
            self._seen.add(message.message_id)
            self._offset = os.fstat(fd).st_size
            return True
        finally:
            os.close(fd)  # releases the lock

    def _catch_up(self, fd: int) -> None:
        """Read the lines written since we last looked (by us or by another process)."""
        size = os.fstat(fd).st_size
        if size < self._offset:  # the file was truncated or replaced: read it all again
            self._seen.clear()
            self._offset = 0
        if size == self._offset:
            return
        data = os.pread(fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1  # a torn last line (crash mid-write) is left for later
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = _line_decoder.decode(line)
            except msgspec.DecodeError:
                continue
            message_id = record.get("message_id")
            if isinstance(message_id, str):
                self._seen.add(message_id)
        self._offset += end

    def messages(self) -> list[dict[str, Any]]:
        """Every message in the file, oldest first (for the demo and tests)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():
            try:
                records.append(_line_decoder.decode(line))
            except msgspec.DecodeError:
                continue
        return records

    async def aclose(self) -> None:
        return None
