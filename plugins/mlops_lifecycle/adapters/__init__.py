"""The embedded local engines behind the local adapters: DuckDB warehouse and sample data, local processes,
the model service as a process and its prediction log. Nothing here talks to a cloud."""
