"""Data: tokenizer, corpus reading, token shards, samples and loaders."""
