"""Planning a job before it runs: the GPU table, the memory plan (and automatic activation checkpointing) and the
step-time model. Library code that takes a `JobConfig`; `ttt-plan` (tools/commands/plan.py) is its command line."""
