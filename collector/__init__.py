"""llamabridge collector: lifetime llama-server metrics (not yet implemented; see the README's roadmap)."""
