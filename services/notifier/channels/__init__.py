"""Delivery channels, each a real protocol and independent of the rest of duban.

``base`` holds the message, the result and the :class:`Channel` protocol; ``smtp``, ``aliyun``,
``tencent``, ``webhook`` and ``file`` each implement it.
"""

from services.notifier.channels.base import (
    Channel,
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Secret,
    SecretNotFound,
    mask_address,
    mask_phone,
)

__all__ = [
    "Channel",
    "DeliveryResult",
    "OutboundMessage",
    "Outcome",
    "Secret",
    "SecretNotFound",
    "mask_address",
    "mask_phone",
]
