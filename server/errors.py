"""What the server's rooms raise for the front doors to map onto status codes (gRPC) and statuses (HTTP)."""


class NotFound(KeyError):
    """No such session for this user (also another user's: never say it exists)."""


class AlreadyExists(ValueError):
    pass


class QuotaExceeded(Exception):
    """Over a per-user quota or limit: refused before anything changed."""


class TooLarge(QuotaExceeded):
    """A request body over the server's limit (HTTP 413): refused while it streams in, before it is parsed."""


class Forbidden(Exception):
    """A request the server will not take from where it came (open mode: another web page, a foreign Host)."""
