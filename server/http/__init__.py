"""The HTTP door: ``app`` builds it; ``health``, ``chat`` (OpenAI's endpoints, over ``answers``), ``sessions``
and ``uploads`` are its routers; ``models`` its bodies; ``common`` what they share."""

from server.http.app import create_app

__all__ = ["create_app"]
