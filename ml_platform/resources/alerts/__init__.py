"""The alerts contract: telling people about a failed pipeline job or a failed Dagster run.

Locally they only go to the log (the sensor's, the run's); with a Slack token configured
they are also posted to a channel (``slack.SlackAlerts``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

_log = logging.getLogger(__name__)


class Alerts(ABC):
    @abstractmethod
    def send(self, title: str, text: str, links: Mapping[str, str] | None = None) -> None:
        """Tell people; must not raise (an alert that cannot be sent is logged instead)."""


class LogAlerts(Alerts):
    """No alert channel configured: the message goes to the log only."""

    def send(self, title: str, text: str, links: Mapping[str, str] | None = None) -> None:
        where = " ".join(f"{name}: {url}" for name, url in (links or {}).items())
        _log.warning("%s: %s %s", title, text, where)
