"""structlog set-up shared by every service: JSON lines in production, readable in a terminal.

Phone numbers are masked (138****1234) and secret-looking keys redacted in every log line,
whatever the caller passed. In JSON mode every record is one line, the standard library's
(uvicorn, nats, asyncpg) too, and nothing in it can end a line or drive a terminal: JSON escapes
the C0 controls, we escape DEL, the C1 controls (U+0085 is a line end to many readers, U+009B a
terminal's CSI) and U+2028/U+2029 as well.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_PHONE = re.compile(r"(?<!\d)(\+?86)?(1[3-9]\d)(\d{4})(\d{4})(?!\d)")
_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|credential|authorization|api_?key", re.I)


def mask_phone_numbers(text: str) -> str:
    return _PHONE.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}****{m.group(4)}", text)


def _redact(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEYS.search(key):
        return "[redacted]"
    if isinstance(value, str):
        return mask_phone_numbers(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


def redact_processor(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        event_dict[key] = _redact(event_dict[key], key)
    return event_dict


# Outside JSON's own escapes (it escapes only U+0000-U+001F), what may end a line or act on a
# terminal. They can occur only inside strings, so escaping them in the rendered text is safe.
_LINE_BREAKERS = re.compile("[\x7f-\x9f\u2028\u2029]")


def _one_line_json(value: Any, **kw: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, **kw)
    return _LINE_BREAKERS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def configure_logging(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Logs go to standard error, or to ``stream`` (the demo keeps its terminal for its view)."""
    redirected = stream is not None
    stream = stream or sys.stderr
    json_lines = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_one_line_json)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (faststream, nats, asyncpg, uvicorn) go through the same
    # rules; in JSON mode as JSON lines (a traceback too: in the record, not on lines of its own).
    stdlib_handler = logging.StreamHandler(stream)
    if json_lines:
        stdlib_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                ],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    redact_processor,
                    renderer,
                ],
            )
        )
    else:
        stdlib_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[stdlib_handler], force=redirected)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_StdlibRedactFilter())
    # HTTP clients log every request line at INFO, and a signed provider URL carries key ids and
    # signatures in its query: only their warnings reach our logs.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _StdlibRedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_phone_numbers(str(record.getMessage()))
        record.args = ()
        return True
