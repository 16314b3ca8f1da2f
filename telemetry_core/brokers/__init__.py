"""The brokers rubrix-telemetry supports: one module each, behind one interface (`base.Broker`).

`broker_for(settings)` is the one place that picks a broker from the URL's scheme, by the
alias table below (kombu's `TRANSPORT_ALIASES` is the model). A scheme kombu knows that has
no module here (`sqs://`, ...) gets `base.Broker`: delivery works, and it says what it
cannot report. A new broker is a new module and its aliases; nothing else changes
(docs/architecture.md walks through one).
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from telemetry_core.brokers.base import Broker
from telemetry_core.settings import Settings

# URL scheme -> "module:class". Modules are imported on first use.
ALIASES = {
    "embedded": "telemetry_core.brokers.embedded:EmbeddedBroker",
    "redis": "telemetry_core.brokers.redis:RedisBroker",
    "rediss": "telemetry_core.brokers.redis:RedisBroker",
    "sentinel": "telemetry_core.brokers.redis:RedisBroker",
    "redis+socket": "telemetry_core.brokers.redis:RedisBroker",  # Redis on a Unix socket
    "amqp": "telemetry_core.brokers.rabbitmq:RabbitMQBroker",
    "amqps": "telemetry_core.brokers.rabbitmq:RabbitMQBroker",
    "pyamqp": "telemetry_core.brokers.rabbitmq:RabbitMQBroker",
}

__all__ = ["ALIASES", "Broker", "broker_class", "broker_for"]


def broker_class(url: str) -> type[Broker]:
    """The Broker class for a broker URL; `base.Broker` for a scheme without a module here."""
    target = ALIASES.get(urlsplit(url).scheme)
    if target is None:
        return Broker
    module, _, name = target.partition(":")
    broker: type[Broker] = getattr(importlib.import_module(module), name)
    return broker


def broker_for(settings: Settings) -> Broker:
    """The broker of these settings (cheap: it connects to nothing until asked)."""
    return broker_class(settings.broker_url_or_default)(settings)
