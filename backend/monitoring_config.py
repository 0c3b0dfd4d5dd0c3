"""TF Serving's `--monitoring_config_file`: whether, and at which REST path, Prometheus metrics are served.

The file is a text `tensorflow.serving.MonitoringConfig`, TF Serving's own message (see `declared_protos`), so
protobuf's text format parses it, with its errors for unknown fields and bad values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from backend import declared_protos

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath


class MonitoringConfigError(declared_protos.ProtoTextError):
    """A monitoring config that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    enabled: bool = False
    path: str = DEFAULT_PROMETHEUS_PATH


def read_monitoring_config(path: str | os.PathLike[str]) -> PrometheusSettings:
    text = declared_protos.read_text(path, "monitoring config", MonitoringConfigError)
    return parse_monitoring_config(text, source=str(path))


def parse_monitoring_config(text: str, source: str = "<monitoring config>") -> PrometheusSettings:
    message = declared_protos.parse_text(declared_protos.MonitoringConfig, text, source, MonitoringConfigError)
    prometheus = message.prometheus_config
    if not prometheus.enable:
        # TF Serving ignores the path of a disabled exporter; so do we, so that its configs keep starting.
        return PrometheusSettings()
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):
        raise MonitoringConfigError(f"{source}: prometheus_config path {path!r} must start with '/'")
    return PrometheusSettings(enabled=True, path=path)
