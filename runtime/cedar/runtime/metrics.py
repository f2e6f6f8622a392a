"""Metrics every service exports, whatever it does."""

from __future__ import annotations

from prometheus_client import Gauge, Info

NATS_CONNECTED = Gauge("cedar_nats_connected", "1 while the NATS connection is up, else 0.")
BUILD_INFO = Info("cedar_build", "Cedar version and the service this process runs.")
