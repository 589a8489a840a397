"""The ground floor every layer may import: config loading, atomic file writes, the pipeline-folder
format, console progress, the local rank launcher and the in-process allocator. It imports nothing
else of the project."""
