"""The embedded local engines behind the local adapters: DuckDB warehouse and sample data, local processes,
the model service as a process. Nothing here talks to a cloud."""
