"""The error hierarchy: each one is turned into a single line and an exit code at the top."""


class AgentError(Exception):
    """Base of every error the agent reports to the user as one line."""

    exit_code = 1


class ConfigError(AgentError):
    """The configuration (file or command line) is invalid."""

    exit_code = 2


class ModelError(AgentError):
    """A model file is missing, unreadable, or not the shape we expect."""

    exit_code = 3


class SourceError(AgentError):
    """The frame source cannot be opened or read."""

    exit_code = 4


class BrokerError(AgentError):
    """The MQTT broker cannot be used (bad address, refused credentials, TLS)."""

    exit_code = 5


class PreviewError(AgentError):
    """The preview window cannot be opened (no display, no GUI support)."""

    exit_code = 6
