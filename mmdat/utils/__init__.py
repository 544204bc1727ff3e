"""Checkpoint utilities: safe loading and official-checkpoint conversion."""
from .checkpoint import (UntrustedCheckpointError, is_trusted, safe_globals,
                         safe_load, trust_checkpoints)

__all__ = ['safe_load', 'safe_globals', 'trust_checkpoints', 'is_trusted',
           'UntrustedCheckpointError']
