"""millrace: the shared contract between edge agents, cloud workers and dashboards."""

__version__ = "0.1.0"
