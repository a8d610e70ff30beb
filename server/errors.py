"""What the server's rooms raise for the front doors to map onto status codes (gRPC) and statuses (HTTP)."""


class NotFound(KeyError):
    """No such session for this user (also another user's: never say it exists)."""


class AlreadyExists(ValueError):
    pass


class QuotaExceeded(Exception):
    """Over a per-user quota or limit: refused before anything changed."""
