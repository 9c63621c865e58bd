"""The run layer: reading the inputs, the pipeline, and the shards that run it."""
