"""What the coordinator keeps on disk: the round log, checkpoints, rollback intents, exported
models.
"""
