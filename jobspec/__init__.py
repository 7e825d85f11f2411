"""The job contract the control plane writes and the trainer child reads: config, job data, examples, events, progress,
the memory estimate, the activation gate, the child's errors. Torch-free; imports the core only."""

from __future__ import annotations
