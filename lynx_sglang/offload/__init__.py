"""Expert cache: host expert store, GPU slots, eviction, transfers, prefetch and counters.

Imports only torch, triton and numpy (never sglang), so it runs and is tested without SGLang.
"""

from .cache import ExpertCache
from .counters import FIELDS as COUNTER_FIELDS
from .plan import Plan, Wave
from .store import HostExpertStore, HostMemoryError, available_host_bytes

__all__ = [
    "COUNTER_FIELDS",
    "ExpertCache",
    "HostExpertStore",
    "HostMemoryError",
    "Plan",
    "Wave",
    "available_host_bytes",
]
