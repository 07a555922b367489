"""The ``fedvlm`` command's own errors, in a light module (no torch, no side effects), so the
command line can name them without importing the demo."""

from __future__ import annotations


class DemoStepFailed(Exception):
    """A process the demo started (the hub, a device, ``clients add``) failed: the message
    carries the last line it wrote and where its whole log is."""
