"""The error hierarchy of livestack.

A rejected frame (no stars, failed alignment) is a *result*, not an exception: stages return it with a
reason. Exceptions are for inputs that cannot be used at all (an unreadable file, a bad configuration)
and for failures of the machinery (a socket that cannot bind).
"""

__all__ = ["CalibrationError", "ConfigError", "FrameError", "LivestackError", "NetworkError", "StateError"]


class LivestackError(Exception):
    """Base class of every error livestack raises on purpose."""


class ConfigError(LivestackError):
    """A configuration file or option is invalid; the message names the file, key and what is allowed."""


class FrameError(LivestackError):
    """A file cannot be used as a frame; the message is one sentence a user can act on."""


class CalibrationError(LivestackError):
    """Calibration masters cannot be made or used as asked; the message names the master and the problem."""


class StateError(LivestackError):
    """The state folder (journal, checkpoints) is unusable or inconsistent."""


class NetworkError(LivestackError):
    """A socket cannot be set up as configured (bind, keys, security policy)."""
