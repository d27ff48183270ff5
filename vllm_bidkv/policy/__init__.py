"""Victim selection and admission order: who is preempted when GPU KV memory runs out.

Pure: no vLLM import. When an allocation fails, the scheduler side builds one
``Candidate`` per preemptible request and one ``Decision`` (the requester, its
shortfall) from the SchedulerContext, and asks the strategy named by ``victim_policy``;
the vLLM hook (``vllm_bidkv.patches``) moves the chosen victim to the end of vLLM's
running list so vLLM preempts it through its own path.
"""

from vllm_bidkv.policy.admission import admission_key
from vllm_bidkv.policy.candidate import Candidate, Decision
from vllm_bidkv.policy.cost import BidCostModel
from vllm_bidkv.policy.strategies import STRATEGIES, ScoredStrategy, VictimStrategy, make_strategy

__all__ = [
    "STRATEGIES",
    "BidCostModel",
    "Candidate",
    "Decision",
    "ScoredStrategy",
    "VictimStrategy",
    "admission_key",
    "make_strategy",
]
