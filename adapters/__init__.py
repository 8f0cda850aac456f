"""Platform adapters. Each platform's module is imported only when it is enabled, so a missing
platform library never breaks the others; this package exports only the shared base."""

from .base import Adapter, Core, ReplyStream, split_message

__all__ = ["Adapter", "Core", "ReplyStream", "split_message"]
