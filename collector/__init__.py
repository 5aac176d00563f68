"""llamabridge collector: lifetime llama-server metrics in SQLite, exported to Prometheus."""
