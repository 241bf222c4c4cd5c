"""`unmask export`: a checkpoint of any engine and layout -> a Hugging Face folder whose Python files are
unmask/core's, unchanged. It sits above unmask.checkpoint (it reads checkpoints) and unmask.model (key maps)."""
