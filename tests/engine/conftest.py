"""Engine processes inherit this environment.

vLLM's CPU backend pins its compute thread to a core picked the same way by every engine on
the box: with another engine running (a colleague's benchmark), both share one core while the
other idles and each engine start takes minutes instead of ~40 s. Unpinned, the OS spreads them.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
