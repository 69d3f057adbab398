"""Process exit codes shared by the CLI and the launchers (SLURM requeue, Kubernetes podFailurePolicy)."""

OK = 0
"""Finished."""
UNEXPECTED = 1
"""An unexpected exception (a bug): do not retry blindly."""
BAD_INPUT = 2
"""Bad config, data, checkpoint or arguments (ValueError): retrying cannot help."""
ENVIRONMENT = 3
"""The environment failed (missing shard, rendezvous, storage; RuntimeError): a retry may help."""
DIVERGED = 4
"""The loss or embeddings became NaN/Inf (FloatingPointError): retrying the same run cannot help."""
REQUEUE = 75
"""Stopped on a signal after saving a checkpoint: requeue/restart the same command to resume (EX_TEMPFAIL)."""

FAIL_FAST = (UNEXPECTED, BAD_INPUT, DIVERGED)
"""Codes a scheduler should not retry."""
