"""Expert cache: host expert store, GPU slots, eviction, transfers, prefetch and counters.

Imports only torch and triton (never sglang), so it runs and is tested without SGLang.
"""

from .cache import ComputeFn, ExpertCache
from .counters import FIELDS as COUNTER_FIELDS
from .plan import Plan, Wave
from .prefetch import PrefetchSelect
from .store import HostExpertStore, HostMemoryError, available_host_bytes

__all__ = [
    "COUNTER_FIELDS",
    "ComputeFn",
    "ExpertCache",
    "HostExpertStore",
    "HostMemoryError",
    "Plan",
    "PrefetchSelect",
    "Wave",
    "available_host_bytes",
]
