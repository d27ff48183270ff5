"""Victim selection and admission order: who is preempted when GPU KV memory runs out.

Pure: no vLLM import. The vLLM hook (``vllm_bidkv.patches``) builds ``Candidate``s from
the SchedulerContext, asks the strategy named by ``victim_policy``, and moves the chosen
victim to the end of vLLM's running list so vLLM preempts it through its own path.
"""

from vllm_bidkv.policy.admission import admission_key
from vllm_bidkv.policy.candidate import Candidate
from vllm_bidkv.policy.cost import BidCostModel
from vllm_bidkv.policy.strategies import STRATEGIES, VictimStrategy, make_strategy

__all__ = [
    "STRATEGIES",
    "BidCostModel",
    "Candidate",
    "VictimStrategy",
    "admission_key",
    "make_strategy",
]
