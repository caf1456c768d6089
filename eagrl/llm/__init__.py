"""The LLM side: prompts, batched generation, answer parsing and the yes/no token scorer."""
