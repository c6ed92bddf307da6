"""Alerts posted to a Slack channel: ``chat.postMessage`` through dagster-slack's client.

``dagster_slack`` and ``slack_sdk`` are imported on first use only: this module is reached
from the code location's definitions, which every run, step and code server imports, and
most of those processes never post anything.

Sending never raises (the ``Alerts`` contract): an alert that cannot be posted is logged
with Slack's reason and what to do about it, because whoever raised the alert (a sensor
tick, a failed run) must not fail or be retried because Slack is unreachable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ml_platform.resources.alerts import Alerts
from ml_platform.resources.retries import (
    Backoff,
    RetryDeadlineError,
    call,
    is_retryable_answer,
    retry_after_seconds,
)

if TYPE_CHECKING:
    from slack_sdk import WebClient

_log = logging.getLogger(__name__)

# Block Kit limits (docs.slack.dev/reference/block-kit/blocks): a header's plain text, a
# section's text. Slack refuses the whole message (invalid_blocks) past them, so we cut.
HEADER_MAX_CHARS = 150
SECTION_MAX_CHARS = 3000
# The top-level `text` is only the notification's fallback when blocks are given.
FALLBACK_MAX_CHARS = 1000

# What a person has to do about Slack's configuration errors (error codes of
# chat.postMessage and of every Web API method: docs.slack.dev/reference/methods/chat.postMessage).
_ERROR_HINTS = {
    "invalid_auth": "Slack rejected the token: check ML_PLATFORM_SLACK_TOKEN",
    "not_authed": "no token reached Slack: check ML_PLATFORM_SLACK_TOKEN",
    "token_revoked": "the token was revoked: reinstall the Slack app and update the token",
    "token_expired": "the token expired: reinstall the Slack app and update the token",
    "account_inactive": "the token belongs to a deleted user or workspace",
    "missing_scope": "the token lacks the chat:write scope",
    "channel_not_found": "no such channel, or the app cannot see it "
    "(a private channel needs the app invited): check ML_PLATFORM_SLACK_CHANNEL",
    "not_in_channel": "the app is not a member of the channel: invite it (/invite @app)",
    "is_archived": "the channel is archived: check ML_PLATFORM_SLACK_CHANNEL",
}
# Rejections of the message's blocks: posting the plain text still gets the alert out.
_BLOCK_ERRORS = frozenset({"invalid_blocks", "invalid_blocks_format", "msg_blocks_too_long"})


def escape_mrkdwn(text: str) -> str:
    """Slack's control characters as entities, so text cannot turn into links or mentions
    (docs.slack.dev/messaging/formatting-message-text: "Escaping text")."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escaped_within(text: str, limit: int) -> str:
    """``text`` escaped, cut so the escaped form fits ``limit`` (never inside an entity)."""
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = escape_mrkdwn(char)
        if size + len(piece) > limit - 1:
            pieces.append("…")
            break
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _link(name: str, url: str) -> str:
    # In <url|label>, `|` and `>` would end the URL early; `&` and `<` are escaped as usual.
    safe_url = escape_mrkdwn(url).replace("|", "%7C")
    return f"<{safe_url}|{escape_mrkdwn(name)}>"


def message_blocks(
    title: str, text: str, links: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The message as Block Kit: a header, the text, then the links on one line."""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _cut(title, HEADER_MAX_CHARS)},
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _escaped_within(text, SECTION_MAX_CHARS)},
        },
    ]
    if links:
        line = " · ".join(_link(name, url) for name, url in links.items())
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": line}})
    return blocks


def fallback_text(title: str, text: str) -> str:
    """The notification text (and what clients without blocks show)."""
    return _escaped_within(f"{title}: {text}", FALLBACK_MAX_CHARS)


def plain_message(title: str, text: str, links: Mapping[str, str] | None = None) -> str:
    """The whole message as mrkdwn text, for when Slack refuses the blocks."""
    body = _escaped_within(f"{title}\n{text}", SECTION_MAX_CHARS)
    if links:
        body += "\n" + " · ".join(_link(name, url) for name, url in links.items())
    return body


class SlackAlerts(Alerts):
    """Posts every alert to one Slack channel.

    ``token`` is a bot token (``xoxb-…``) with the ``chat:write`` scope, and the app must be
    a member of ``channel``. ``api_url`` replaces Slack's ``https://slack.com/api/`` (GovSlack
    is ``https://slack-gov.com/api/``; the tests point it at a local server).

    A 429 (or 5xx) is retried after Slack's ``Retry-After``, at most ``max_rate_limit_retries``
    times and ``max_wait_seconds`` in all (``retries.call``): alerts are sent from sensor ticks,
    which Dagster times out (60 s by default), and a dropped alert that is logged beats a tick
    that never ends. An unreachable Slack is not waited for.
    """

    def __init__(
        self,
        token: str,
        channel: str,
        *,
        api_url: str | None = None,
        timeout_seconds: int = 10,
        max_rate_limit_retries: int = 3,
        max_wait_seconds: float = 20.0,
    ) -> None:
        if not token:
            raise ValueError("SlackAlerts needs a token (ML_PLATFORM_SLACK_TOKEN)")
        if not channel:
            raise ValueError("SlackAlerts needs a channel (ML_PLATFORM_SLACK_CHANNEL)")
        self._token = token
        self.channel = channel
        self.api_url = api_url
        self._timeout_seconds = timeout_seconds
        self._max_rate_limit_retries = max_rate_limit_retries
        self._max_wait_seconds = max_wait_seconds
        self._web_client: WebClient | None = None

    def __repr__(self) -> str:  # never show the token
        return f"SlackAlerts(channel={self.channel!r}, api_url={self.api_url!r})"

    def _client(self) -> WebClient:
        if self._web_client is None:
            from dagster_slack import SlackResource

            client = SlackResource(token=self._token).get_client()
            # SlackResource takes only the token; base_url and timeout are the WebClient's
            # documented attributes (slack_sdk.web.base_client.BaseClient), read on every
            # request. The client's default timeout, 30 s, is too long inside a sensor tick.
            client.timeout = self._timeout_seconds
            if self.api_url:
                client.base_url = self.api_url if self.api_url.endswith("/") else self.api_url + "/"
            self._web_client = client
        return self._web_client

    def send(self, title: str, text: str, links: Mapping[str, str] | None = None) -> None:
        self.post(title, text, links)

    def post(
        self,
        title: str,
        text: str,
        links: Mapping[str, str] | None = None,
        *,
        log: logging.Logger | None = None,
    ) -> str | None:
        """Post one message; None when Slack took it, else why not (also logged to ``log``,
        e.g. a sensor's ``context.log``, which shows in the tick's logs in the UI)."""
        log = log or _log
        try:
            reason = self._post(title, text, links, log)
        except OSError as error:  # refused, timed out, DNS, TLS (urllib's URLError included)
            reason = f"could not reach Slack at {self._client().base_url}: {error}"
        except Exception as error:  # the contract: never raise; say what happened instead
            reason = f"{type(error).__name__}: {error}"
        if reason is None:
            return None
        log.warning(
            "Slack alert %r not posted to %s: %s. The alert was: %s %s",
            title,
            self.channel,
            reason,
            text,
            " ".join(f"{name}: {url}" for name, url in (links or {}).items()),
        )
        return reason

    def _post(
        self, title: str, text: str, links: Mapping[str, str] | None, log: logging.Logger
    ) -> str | None:
        from slack_sdk.errors import SlackApiError

        client = self._client()
        # Rate limits wait for Slack's Retry-After (1 s without one), within this alert's budget.
        backoff = Backoff(
            initial=1.0,
            maximum=self._max_wait_seconds,
            deadline=self._max_wait_seconds,
            retries=self._max_rate_limit_retries,
        )

        def rate_limited(error: Exception) -> bool:
            return isinstance(error, SlackApiError) and is_retryable_answer(error)

        # The message as blocks; if Slack refuses the blocks, the same alert as plain text.
        for blocks in (message_blocks(title, text, links), None):
            try:
                response = call(
                    lambda blocks=blocks: client.chat_postMessage(
                        channel=self.channel,
                        text=fallback_text(title, text)
                        if blocks
                        else plain_message(title, text, links),
                        blocks=blocks,
                        # Links to the Dagster UI and consoles need a login: no previews.
                        unfurl_links=False,
                        unfurl_media=False,
                    ),
                    transient=rate_limited,
                    backoff=backoff,
                    retry_after=_slack_wait,
                )
            except RetryDeadlineError as gave_up:
                answer = gave_up.cause.response
                delay = _slack_wait(gave_up.cause)
                return (
                    f"rate limited by Slack ({answer.get('error')}); Retry-After {delay:g}s is "
                    f"past the {self._max_wait_seconds:g}s this alert may wait"
                )
            except SlackApiError as error:
                status = error.response.status_code
                code = str(error.response.get("error") or f"HTTP {status}")
                if is_retryable_answer(error):
                    what = (
                        "rate limited by Slack" if code == "ratelimited" else "Slack kept failing"
                    )
                    return f"{what} ({code}) after {backoff.retries} retries"
                if code in _BLOCK_ERRORS and blocks is not None:
                    log.warning("Slack refused the message's blocks (%s); posting plain text", code)
                    continue
                hint = _ERROR_HINTS.get(code)
                return f"{code} ({hint})" if hint else f"Slack answered {code} (HTTP {status})"
            log.info("posted alert %r to %s (ts %s)", title, self.channel, response.get("ts"))
            return None
        raise AssertionError("unreachable: the plain-text attempt returns")


def _slack_wait(error: Exception) -> float:
    """Seconds to wait before posting again: Slack's Retry-After (whole seconds), else 1 s."""
    seconds = retry_after_seconds(error.response.headers)
    return 1.0 if seconds is None else seconds
