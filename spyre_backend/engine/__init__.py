"""The LLM engine: scheduler, paged KV cache, model runner, sampler and detokenizer kept apart."""
