"""The training control plane, in the bot's process: the job table, the supervisor, runners, executors, pre-flight,
the dataset a job trains on, endings and the job's erasure part. It starts the trainer child; it never imports torch.
"""

from __future__ import annotations
