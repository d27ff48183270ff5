"""Workloads: seeded request traces, the same for the simulator and the real engine.

A workload is a list of ``TraceRequest`` (arrival time, prompt length, output length,
optionally a prefix group) sorted by arrival. Token ids are made on demand by
``Workload.prompt_token_ids``: the first ``prefix_len`` tokens come from the group's
own seeded stream (so every request of a group shares them, whatever its length) and
the rest from the request's own stream. Same name, rate, seed and scale: same bytes.

Generators (``WORKLOADS``), lengths in tokens before ``length_scale``:

* ``mixed`` — Poisson arrivals; each request drawn from ``MIXED_CLASSES``
  (chat 55%: prompt 64–512, output 64–256; long-input 25%: prompt 512–1536, output
  32–128; long-output 20%: prompt 32–256, output 256–512, all uniform). 40% of requests
  start with one of 8 system prompts of 128–512 tokens (prefix groups ``sys0``..``sys7``).
  Our own mix (bidkv's ShareGPT pool is not available here), chosen to be at least as
  KV-hungry as a chat trace: ~630 tokens per request against 600×16 GPU slots.
* ``multi-turn`` — chat sessions start as a Poisson process (request rate / mean turns);
  2–6 turns each; every turn resends the session's whole history (earlier prompts and
  outputs) plus a new message of 32–256 tokens (the first 64–512), output 32–256; the
  next turn arrives 2–20 s (uniform "think time") after the previous one, open loop.
  The resent outputs are the session stream's tokens, not the model's actual output, so
  they are recomputed (as a prompt) rather than hit in the prefix cache: a lower bound
  on reuse.
* ``long-context`` — Poisson arrivals; 70% standalone prompts of 2048–6144 tokens, 30%
  questions (32–256 tokens) over one of 4 shared documents of 2048–4096 tokens; output
  64–256.
* ``chat`` — CLOSED-LOOP multi-turn sessions (``ChatSessions``): sessions start as a
  Poisson process (request rate / mean turns, 3–8 turns each); turn 1 is a message of
  64–512 tokens, half of the sessions behind one of 8 system prompts (128–512); turn k+1
  is sent only when turn k's answer has arrived, after a think time of 2–20 s, and its
  prompt is turn k's prompt + turn k's *actual* output tokens + a new message of 32–256;
  outputs 32–256. At the H100 presets' rates that is ~40–60 live sessions of ~1–4k
  tokens each against 9,600 GPU token slots.
* ``agentic`` — closed-loop agent sessions: a 1024-token tool prefix shared by every
  session, then a per-session context of documents (1536–4096) and a task (64–256); 8–16
  short turns (tool results 32–192 tokens in, 16–96 out) 0.5–3 s apart (tool execution).
* ``rag`` — Poisson arrivals; each request is one of 64 documents (1024–3072 tokens) drawn
  with Zipf popularity (P(rank k) ∝ 1/k) plus a question of 16–128 tokens; output 32–256.
* ``multi-round-qa`` — LMCache's multi-round QA shape (PEERS (f)), closed loop: users
  arrive as a Poisson process (request rate / mean rounds, 4–6 rounds each); every user's
  first prompt is one system prompt of 1,000 tokens shared by all users, then the user's own
  context of 1,500–2,500 tokens and a question of 16–64; round k+1 is round k's prompt +
  its actual answer + a new question, sent 1–4 s (think time) after the answer; answers
  80–120 tokens (LMCache's 100).
* ``long-doc-qa`` — vLLM's long-document QA shape (PEERS (f)): 8 documents of 4,096–7,680
  tokens, each asked ``num_requests / 8`` questions (16–64 tokens after the document),
  interleaved: every round asks each document once, in a shuffled order; Poisson arrivals;
  outputs 32–128. A document comes back only after the seven others.
* ``bursty`` — bursts of 8 requests (burst starts Poisson at rate/8, requests within a
  burst 50 ms apart on average); each burst shares one of 3 system prompts of 96–256
  tokens; bodies 32–224, outputs 64–192 tokens. The demo's workload.

Closed-loop workloads (``chat``, ``agentic``, ``multi-round-qa``) carry a ``ChatSessions``: their ``requests``
start with each session's first turn and grow while a runner plays them —
``Workload.on_finish(index, prompt_ids, output_ids, finish_s)`` (or
``ChatSessions.next_turn`` directly, for an engine runner with real outputs) returns the
next turn. ``Workload.replay()`` gives a fresh copy (first turns only) for each run;
``total_requests`` is known in advance (output lengths are fixed: ``ignore_eos``), and a
session ends before a turn whose prompt + output would exceed ``max_context``.
``think_scale`` multiplies every think time (the real-engine presets play whole sessions
in a short run).

Trace files (``load_jsonl``): one JSON object per line with ``arrival_s``, ``prompt_len``
or ``prompt_tokens``, ``output_len``, optionally ``prefix_group`` with ``prefix_len``.
Every problem raises ``ValueError`` naming the file, the line and the key; unknown keys
are errors too (a misspelt key silently ignored would be a different experiment).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Token ids below this are the tiny tokenizer's special tokens (<unk>, <s>, </s>).
FIRST_TOKEN_ID = 3


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_group: str | None = None
    prefix_len: int = 0
    prompt_tokens: tuple[int, ...] | None = None  # explicit ids (trace files); else generated


# The tiny tokenizer's vocabulary (the simulator's model): closed-loop sessions draw ids below it.
DEFAULT_VOCAB = 512


@dataclass(frozen=True)
class SessionPlan:
    """One session, decided up front except for its outputs' token ids."""

    start_s: float
    first_prompt: tuple[int, ...]
    messages: tuple[tuple[int, ...], ...]
    """The new message of turns 2..n."""
    output_lens: tuple[int, ...]
    """Per turn (n)."""
    think_s: tuple[float, ...]
    """Delay between turn k's answer and turn k+1's arrival (n−1)."""


class ChatSessions:
    """Closed-loop sessions: turn k+1 = turn k's prompt + turn k's actual output + a new message.

    The one place the session logic lives; a runner drives it with the outputs it really
    got: ``first_turns()`` for the start, then ``next_turn(session, prompt_ids, output_ids,
    finish_time)`` whenever a turn's answer is complete (None: the session is over).
    """

    def __init__(self, plans: list[SessionPlan]) -> None:
        self.plans = plans
        self._turn = [0] * len(plans)

    def fresh(self) -> ChatSessions:
        return ChatSessions(self.plans)

    @property
    def total_turns(self) -> int:
        return sum(len(p.output_lens) for p in self.plans)

    def first_turns(self) -> list[tuple[int, TraceRequest]]:
        out = []
        for session, plan in enumerate(self.plans):
            prompt = plan.first_prompt
            out.append(
                (session, TraceRequest(plan.start_s, len(prompt), plan.output_lens[0], prompt_tokens=prompt))
            )
        return out

    def next_turn(
        self, session: int, prompt_ids: list[int], output_ids: list[int], finish_time: float
    ) -> TraceRequest | None:
        plan = self.plans[session]
        self._turn[session] += 1
        turn = self._turn[session]
        if turn >= len(plan.output_lens):
            return None
        prompt = (*prompt_ids, *output_ids, *plan.messages[turn - 1])
        return TraceRequest(
            finish_time + plan.think_s[turn - 1], len(prompt), plan.output_lens[turn], prompt_tokens=prompt
        )


@dataclass
class Workload:
    name: str
    seed: int
    requests: list[TraceRequest]
    _streams: dict[str, list[int]] = field(default_factory=dict, repr=False)
    sessions: ChatSessions | None = None
    """Closed loop: ``requests`` grows by ``on_finish`` while a runner plays the workload."""
    turns: list[tuple[int, int]] = field(default_factory=list, repr=False)
    """Closed loop: (session, turn) of each request, in ``requests`` order."""

    @property
    def total_requests(self) -> int:
        return len(self.requests) if self.sessions is None else self.sessions.total_turns

    def replay(self) -> Workload:
        """A copy to play from the start (closed loop: first turns only); static workloads: itself."""
        if self.sessions is None:
            return self
        sessions = self.sessions.fresh()
        first = sorted(sessions.first_turns(), key=lambda t: t[1].arrival_s)
        return Workload(
            self.name, self.seed, [r for _, r in first], sessions=sessions, turns=[(s, 0) for s, _ in first]
        )

    def head(self, n: int) -> Workload:
        """The first ``n`` requests (closed loop: the first sessions holding ``n`` turns), same ids."""
        if self.sessions is None:
            return Workload(self.name, self.seed, self.requests[:n])
        plans, turns = [], 0
        for plan in self.sessions.plans:
            if turns >= n:
                break
            plans.append(plan)
            turns += len(plan.output_lens)
        return Workload(self.name, self.seed, [], sessions=ChatSessions(plans)).replay()

    def on_finish(
        self, index: int, prompt_ids: list[int], output_ids: list[int], finish_s: float
    ) -> int | None:
        """Request ``index`` finished: its session's next turn is appended; its index, or None."""
        if self.sessions is None:
            return None
        session, turn = self.turns[index]
        request = self.sessions.next_turn(session, prompt_ids, output_ids, finish_s)
        if request is None:
            return None
        self.requests.append(request)
        self.turns.append((session, turn + 1))
        return len(self.requests) - 1

    def request_id(self, index: int) -> str:
        """Closed loop: named by session and turn, so ids do not depend on the order turns finish."""
        if self.sessions is not None:
            session, turn = self.turns[index]
            return f"{self.name}-{session}.{turn}"
        return f"{self.name}-{index}"

    def prompt_token_ids(self, index: int, vocab_size: int) -> list[int]:
        req = self.requests[index]
        if req.prompt_tokens is not None:
            return list(req.prompt_tokens)
        prefix = self._group_stream(req.prefix_group, req.prefix_len, vocab_size) if req.prefix_group else []
        rng = random.Random(f"{self.seed}/req/{index}")
        body = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(req.prompt_len - req.prefix_len)]
        return prefix + body

    def _group_stream(self, group: str, length: int, vocab_size: int) -> list[int]:
        # One stream per group, extended on demand: a longer prefix extends a shorter one.
        stream = self._streams.setdefault(group, [])
        if len(stream) < length:
            rng = random.Random(f"{self.seed}/group/{group}/{vocab_size}")
            stream[:] = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]
        return stream[:length]

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0


def _scaled(rng: random.Random, lo: int, hi: int, scale: float) -> int:
    return max(1, round(rng.randint(lo, hi) * scale))


# (class, weight, prompt range, output range) of the ``mixed`` workload.
MIXED_CLASSES: tuple[tuple[str, float, tuple[int, int], tuple[int, int]], ...] = (
    ("chat", 0.55, (64, 512), (64, 256)),
    ("long-input", 0.25, (512, 1536), (32, 128)),
    ("long-output", 0.20, (32, 256), (256, 512)),
)


def _prefixes(rng: random.Random, n: int, lo: int, hi: int, scale: float) -> list[int]:
    return [_scaled(rng, lo, hi, scale) for _ in range(n)]


def mixed(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"mixed/{seed}")
    system = _prefixes(rng, 8, 128, 512, length_scale)
    weights = [w for _, w, _, _ in MIXED_CLASSES]
    out, clock = [], 0.0
    for _ in range(num_requests):
        clock += rng.expovariate(rate)
        _, _, (plo, phi), (olo, ohi) = rng.choices(MIXED_CLASSES, weights)[0]
        body = _scaled(rng, plo, phi, length_scale)
        output = _scaled(rng, olo, ohi, length_scale)
        if rng.random() < 0.4:
            group = rng.randrange(len(system))
            out.append(TraceRequest(clock, system[group] + body, output, f"sys{group}", system[group]))
        else:
            out.append(TraceRequest(clock, body, output))
    return Workload("mixed", seed, out)


def multi_turn(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"multi-turn/{seed}")
    mean_turns = 4.0
    out: list[TraceRequest] = []
    session, start = 0, 0.0
    while True:
        start += rng.expovariate(rate / mean_turns)
        # Stop once no later session can arrive among the first num_requests requests.
        if len(out) >= num_requests and start > sorted(r.arrival_s for r in out)[num_requests - 1]:
            break
        history, arrival = 0, start
        for turn in range(rng.randint(2, 6)):
            message = (
                _scaled(rng, 64, 512, length_scale) if turn == 0 else _scaled(rng, 32, 256, length_scale)
            )
            output = _scaled(rng, 32, 256, length_scale)
            prompt = history + message
            out.append(TraceRequest(arrival, prompt, output, f"session{session}", prompt))
            history = prompt + output
            arrival += rng.uniform(2.0, 20.0)
        session += 1
    out.sort(key=lambda r: r.arrival_s)
    return Workload("multi-turn", seed, out[:num_requests])


def long_context(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"long-context/{seed}")
    documents = _prefixes(rng, 4, 2048, 4096, length_scale)
    out, clock = [], 0.0
    for _ in range(num_requests):
        clock += rng.expovariate(rate)
        output = _scaled(rng, 64, 256, length_scale)
        if rng.random() < 0.3:
            doc = rng.randrange(len(documents))
            question = _scaled(rng, 32, 256, length_scale)
            out.append(TraceRequest(clock, documents[doc] + question, output, f"doc{doc}", documents[doc]))
        else:
            out.append(TraceRequest(clock, _scaled(rng, 2048, 6144, length_scale), output))
    return Workload("long-context", seed, out)


def bursty(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"bursty/{seed}")
    burst_size = 8
    system = _prefixes(rng, 3, 96, 256, length_scale)
    out: list[TraceRequest] = []
    burst_start = 0.0
    while len(out) < num_requests:
        group = rng.randrange(len(system))
        arrival = burst_start
        for _ in range(min(burst_size, num_requests - len(out))):
            body = _scaled(rng, 32, 224, length_scale)
            output = _scaled(rng, 64, 192, length_scale)
            out.append(TraceRequest(arrival, system[group] + body, output, f"sys{group}", system[group]))
            arrival += rng.expovariate(20.0)
        burst_start += rng.expovariate(rate / burst_size)
    out.sort(key=lambda r: r.arrival_s)
    return Workload("bursty", seed, out)


def _ids(rng: random.Random, n: int, vocab: int = DEFAULT_VOCAB) -> tuple[int, ...]:
    return tuple(rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n))


def _closed_loop(
    name: str,
    seed: int,
    num_requests: int,
    session_rate: float,
    make_session: Callable[[random.Random, float], SessionPlan],
    max_context: int,
    think_scale: float,
) -> Workload:
    rng = random.Random(f"{name}/{seed}")
    plans: list[SessionPlan] = []
    turns, start = 0, 0.0
    while turns < num_requests:
        start += rng.expovariate(session_rate)
        plan = make_session(rng, start)
        # Truncate: the turn budget, and max_context (prompt lengths are known: outputs are fixed).
        keep, length = 0, len(plan.first_prompt)
        for k, out_len in enumerate(plan.output_lens):
            if k > 0:
                length += plan.output_lens[k - 1] + len(plan.messages[k - 1])
            if length + out_len > max_context or turns + keep >= num_requests:
                break
            keep += 1
        if keep == 0:
            continue
        plans.append(
            SessionPlan(
                plan.start_s,
                plan.first_prompt,
                plan.messages[: keep - 1],
                plan.output_lens[:keep],
                tuple(t * think_scale for t in plan.think_s[: keep - 1]),
            )
        )
        turns += keep
    sessions = ChatSessions(plans)
    return Workload(name, seed, [], sessions=sessions).replay()


def _session(
    rng: random.Random,
    start: float,
    first: tuple[int, ...],
    turns: int,
    message: tuple[int, int],
    output: tuple[int, int],
    think: tuple[float, float],
    scale: float,
) -> SessionPlan:
    """A session of ``turns`` turns after ``first``: messages, outputs and think times drawn
    uniformly from their ranges (lengths × ``scale``), in that order."""
    return SessionPlan(
        start,
        first,
        tuple(_ids(rng, _scaled(rng, *message, scale)) for _ in range(turns - 1)),
        tuple(_scaled(rng, *output, scale) for _ in range(turns)),
        tuple(rng.uniform(*think) for _ in range(turns - 1)),
    )


def chat(
    num_requests: int,
    rate: float,
    seed: int,
    length_scale: float = 1.0,
    max_context: int = 8192,
    think_scale: float = 1.0,
) -> Workload:
    srng = random.Random(f"chat/{seed}/system")
    system = [_ids(srng, _scaled(srng, 128, 512, length_scale)) for _ in range(8)]
    mean_turns = 5.5

    def session(rng: random.Random, start: float) -> SessionPlan:
        n = rng.randint(3, 8)
        first = _ids(rng, _scaled(rng, 64, 512, length_scale))
        if rng.random() < 0.5:
            first = system[rng.randrange(len(system))] + first
        return _session(rng, start, first, n, (32, 256), (32, 256), (2.0, 20.0), length_scale)

    return _closed_loop("chat", seed, num_requests, rate / mean_turns, session, max_context, think_scale)


def agentic(
    num_requests: int,
    rate: float,
    seed: int,
    length_scale: float = 1.0,
    max_context: int = 8192,
    think_scale: float = 1.0,
) -> Workload:
    tools = _ids(random.Random(f"agentic/{seed}/tools"), _scaled(random.Random(0), 1024, 1024, length_scale))
    mean_turns = 12.0

    def session(rng: random.Random, start: float) -> SessionPlan:
        n = rng.randint(8, 16)
        context = _ids(rng, _scaled(rng, 1536, 4096, length_scale)) + _ids(
            rng, _scaled(rng, 64, 256, length_scale)
        )
        return _session(rng, start, tools + context, n, (32, 192), (16, 96), (0.5, 3.0), length_scale)

    return _closed_loop("agentic", seed, num_requests, rate / mean_turns, session, max_context, think_scale)


def multi_round_qa(
    num_requests: int,
    rate: float,
    seed: int,
    length_scale: float = 1.0,
    max_context: int = 8192,
    think_scale: float = 1.0,
) -> Workload:
    system = _ids(
        random.Random(f"multi-round-qa/{seed}/system"), _scaled(random.Random(0), 1000, 1000, length_scale)
    )
    mean_rounds = 5.0

    def user(rng: random.Random, start: float) -> SessionPlan:
        n = rng.randint(4, 6)
        context = _ids(rng, _scaled(rng, 1500, 2500, length_scale))
        first = system + context + _ids(rng, _scaled(rng, 16, 64, length_scale))
        return _session(rng, start, first, n, (16, 64), (80, 120), (1.0, 4.0), length_scale)

    return _closed_loop(
        "multi-round-qa", seed, num_requests, rate / mean_rounds, user, max_context, think_scale
    )


def long_doc_qa(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"long-doc-qa/{seed}")
    documents = _prefixes(rng, 8, 4096, 7680, length_scale)
    order: list[int] = []
    while len(order) < num_requests:  # interleaved: each round asks every document once
        round_ = list(range(len(documents)))
        rng.shuffle(round_)
        order += round_
    out, clock = [], 0.0
    for doc in order[:num_requests]:
        clock += rng.expovariate(rate)
        question = _scaled(rng, 16, 64, length_scale)
        output = _scaled(rng, 32, 128, length_scale)
        out.append(TraceRequest(clock, documents[doc] + question, output, f"doc{doc}", documents[doc]))
    return Workload("long-doc-qa", seed, out)


def rag(num_requests: int, rate: float, seed: int, length_scale: float = 1.0) -> Workload:
    rng = random.Random(f"rag/{seed}")
    documents = _prefixes(rng, 64, 1024, 3072, length_scale)
    weights = [1.0 / (k + 1) for k in range(len(documents))]  # Zipf, s = 1
    out, clock = [], 0.0
    for _ in range(num_requests):
        clock += rng.expovariate(rate)
        doc = rng.choices(range(len(documents)), weights)[0]
        question = _scaled(rng, 16, 128, length_scale)
        output = _scaled(rng, 32, 256, length_scale)
        out.append(TraceRequest(clock, documents[doc] + question, output, f"doc{doc}", documents[doc]))
    return Workload("rag", seed, out)


Generator = Callable[[int, float, int, float], Workload]
WORKLOADS: dict[str, Generator] = {
    "mixed": mixed,
    "multi-turn": multi_turn,
    "long-context": long_context,
    "bursty": bursty,
    "chat": chat,
    "agentic": agentic,
    "rag": rag,
    "multi-round-qa": multi_round_qa,
    "long-doc-qa": long_doc_qa,
}
CLOSED_LOOP = ("chat", "agentic", "multi-round-qa")


def make_workload(
    name: str,
    num_requests: int,
    rate: float,
    seed: int,
    length_scale: float = 1.0,
    max_context: int | None = None,
    think_scale: float = 1.0,
) -> Workload:
    """``max_context`` and ``think_scale`` (× every think time) apply to closed-loop workloads only."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if num_requests < 1 or not rate > 0 or not length_scale > 0 or not think_scale > 0:
        raise ValueError(
            f"workload {name}: need num_requests >= 1, rate > 0, length_scale > 0, think_scale > 0"
        )
    if name not in CLOSED_LOOP:
        return WORKLOADS[name](num_requests, rate, seed, length_scale)
    extra: dict[str, float] = {"think_scale": think_scale}
    if max_context is not None:  # else the generator's own default
        extra["max_context"] = max_context
    return WORKLOADS[name](num_requests, rate, seed, length_scale, **extra)  # type: ignore[call-arg]


# -- JSONL traces ----------------------------------------------------------------
_KEYS = {"arrival_s", "prompt_len", "prompt_tokens", "output_len", "prefix_group", "prefix_len"}


def _int(where: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key}={value!r} must be an integer >= {minimum}")
    return value


def _parse_line(where: str, obj: Any) -> TraceRequest:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    for key in ("arrival_s", "output_len"):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")
    arrival = obj["arrival_s"]
    if (
        isinstance(arrival, bool)
        or not isinstance(arrival, int | float)
        or not math.isfinite(arrival)
        or arrival < 0
    ):
        raise ValueError(f"{where}: arrival_s={arrival!r} must be a finite number >= 0")
    output_len = _int(where, "output_len", obj["output_len"], 1)
    tokens = obj.get("prompt_tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{where}: prompt_tokens must be a non-empty list of token ids")
        for i, token in enumerate(tokens):
            _int(where, f"prompt_tokens[{i}]", token, 0)
        if "prompt_len" in obj and obj["prompt_len"] != len(tokens):
            raise ValueError(
                f"{where}: prompt_len={obj['prompt_len']!r} but prompt_tokens has {len(tokens)} ids"
            )
        if "prefix_group" in obj or "prefix_len" in obj:
            raise ValueError(
                f"{where}: prefix_group/prefix_len cannot be combined with explicit prompt_tokens"
            )
        return TraceRequest(float(arrival), len(tokens), output_len, prompt_tokens=tuple(tokens))
    if "prompt_len" not in obj:
        raise ValueError(f"{where}: missing key 'prompt_len' (or 'prompt_tokens')")
    prompt_len = _int(where, "prompt_len", obj["prompt_len"], 1)
    group, prefix_len = obj.get("prefix_group"), obj.get("prefix_len")
    if (group is None) != (prefix_len is None):
        raise ValueError(f"{where}: prefix_group and prefix_len must be given together")
    if group is None:
        return TraceRequest(float(arrival), prompt_len, output_len)
    if isinstance(group, bool) or not isinstance(group, str | int) or group == "":
        raise ValueError(f"{where}: prefix_group={group!r} must be a non-empty string or an integer")
    prefix_len = _int(where, "prefix_len", prefix_len, 1)
    if prefix_len > prompt_len:
        raise ValueError(f"{where}: prefix_len={prefix_len} exceeds prompt_len={prompt_len}")
    return TraceRequest(float(arrival), prompt_len, output_len, str(group), prefix_len)


def load_jsonl(path: str | Path, seed: int = 0) -> Workload:
    """A trace file as a workload named after the file; sorted by arrival (stable)."""
    path = Path(path)
    requests = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            requests.append(_parse_line(where, obj))
    if not requests:
        raise ValueError(f"{path}: no requests (empty trace)")
    requests.sort(key=lambda r: r.arrival_s)
    return Workload(path.stem, seed, requests)


def write_jsonl(workload: Workload, path: str | Path) -> None:
    """The workload as a trace file ``load_jsonl`` reads back to the same requests."""
    if workload.sessions is not None:
        raise ValueError(
            f"workload {workload.name} is closed-loop: its later turns depend on the outputs, "
            "so it has no fixed trace"
        )
    with Path(path).open("w", encoding="utf-8") as f:
        for req in workload.requests:
            row: dict[str, Any] = {"arrival_s": req.arrival_s, "output_len": req.output_len}
            if req.prompt_tokens is not None:
                row["prompt_tokens"] = list(req.prompt_tokens)
            else:
                row["prompt_len"] = req.prompt_len
            if req.prefix_group is not None:
                row["prefix_group"], row["prefix_len"] = req.prefix_group, req.prefix_len
            f.write(json.dumps(row) + "\n")
