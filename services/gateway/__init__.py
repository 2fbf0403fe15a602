"""The HTTP gateway: OpenAI-compatible API in front of the tokenizer and router services."""
