"""The trainer's components (``python -m xmodel.train`` is the entry point): config, corpus, tokenizer, data,
schedule, optimizer, checkpoints, distributed wrapping and metrics -- one small module each."""
