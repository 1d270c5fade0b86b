"""Data: conversations and chat templates, the processor, webdataset shards, the demo and LLaVA tools."""
