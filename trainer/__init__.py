"""The training program: entry point, loop, models and TTT patching, data, checkpoints, logging."""
