"""What every GAPIC client of ours shares (Vertex AI's pipeline and model services): how it is
made for an endpoint, and which errors mean the API could not be reached or answered no.
Google libraries are imported on call: the code location imports this module."""

from __future__ import annotations

from typing import Any


def gapic_client(client_class: type, *, endpoint: str, credentials: Any, transport: str) -> Any:
    """A GAPIC client for ``endpoint``. A plain-HTTP endpoint is a local stand-in: a real
    token must never travel unencrypted, so without credentials it goes anonymous."""
    if credentials is None and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return client_class(
        transport=transport, credentials=credentials, client_options={"api_endpoint": endpoint}
    )


def api_errors() -> tuple[type[BaseException], ...]:
    """A call's failures that are the API's, not ours: Google's errors, credentials that
    cannot refresh (metadata server, federation), a connection that broke."""
    import requests
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError

    return (exceptions.GoogleAPIError, GoogleAuthError, requests.exceptions.RequestException)
