"""llamabridge proxy: one port that speaks Anthropic and OpenAI to every agent, in front of llama-server."""
