"""cfms-trio: a self-hosted confidential document-management server on Trio."""

__version__ = "0.1.0"
