"""The RL side: `RolloutService` (seed 002) and the trainer's weight sync into engines."""

from rollserve.rl.rollout_service import RolloutService
from rollserve.rl.weight_sync import WeightSync, WeightSyncError

__all__ = ["RolloutService", "WeightSync", "WeightSyncError"]
