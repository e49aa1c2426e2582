"""Offline data preparation: image folders → WebDataset shards (`shards`), quickstart shards (`sample`)."""
