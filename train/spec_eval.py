"""Offline speculative decoding: a batched loop over the target's paged forward, a drafter's ``propose``
and the serving rejection rule (engine/spec/rejection.py), recording every verify round.

Round (DEEPSPEC_FORMAT.md section 2 steps 8-11): the drafter proposes B tokens from the anchor; the
target verifies [anchor, x_0 .. x_{B-1}] at positions start..start+B; a = accepted prefix; the round
emits a + 1 tokens (accepted + recovered / bonus; a stop token among the accepted drafts ends the
request there without a bonus, and the round then counts the drafts kept). Context rows 0..a of the
verify pass become drafter context. Accepted length tau = sum of round acceptance lengths / rounds.
This is the evaluator used before the engine exposes its own speculation counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode.drafter import DraftBatch
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.rejection import DraftProbs, RaggedDrafts
from sparkserve.engine.spec_decode.verifier import Verifier, VerifyInput, emitted_tokens
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.train.generate import sample_next

PAGE = 16


@dataclass
class SpecResult:
    """All rounds of one run.

    Attributes:
        outputs: generated tokens per prompt.
        accept_lengths: per round, tokens the round emitted (a + 1; the kept drafts when a stop ended it).
        num_drafted: per round, n_eff (B, or the stop draft's index + 1).
        num_accepted: per round, a.
        conf_logits: [rounds, B] raw confidence logits (before calibration temperatures), None if the
            drafter has no confidence head.
    """

    outputs: list[list[int]]
    accept_lengths: list[int] = field(default_factory=list)
    num_drafted: list[int] = field(default_factory=list)
    num_accepted: list[int] = field(default_factory=list)
    conf_logits: Tensor | None = None

    @property
    def num_rounds(self) -> int:
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        return sum(self.accept_lengths) / max(1, self.num_rounds)

    @property
    def labels(self) -> Tensor:
        """[rounds, B] bool: drafts 0..k all accepted (the stochastic-acceptance prefix)."""
        b = self.conf_logits.shape[1] if self.conf_logits is not None else max(self.num_drafted, default=1)
        return torch.arange(b)[None, :] < torch.tensor(self.num_accepted)[:, None]


def _slots(table: list[int], positions: range) -> list[int]:
    return [table[p // PAGE] * PAGE + p % PAGE for p in positions]


def _raw_conf_logits(drafter: DSparkDrafter, conf: Tensor, greedy: bool) -> Tensor:
    """Invert c = sigmoid(logit / T_k) with the temperatures the drafter applied: [R, B] -> raw logits."""
    temps = drafter.confidence_temperature_matrix([greedy] * conf.shape[0])
    c = conf.detach().float().cpu().clamp(1e-7, 1 - 1e-7)
    return torch.log(c / (1 - c)) * temps


@torch.inference_mode()
def run_spec_decode(target: LlamaForCausalLM, drafter: DSparkDrafter, prompts: list[list[int]], max_new_tokens: int,
                    temperature: float, stop_ids: set[int], seed: int) -> SpecResult:
    """Speculative generation of every prompt at once (T = 0: greedy; else plain softmax(logits / T))."""
    torch.manual_seed(seed)
    device, dtype = target.embed_tokens.weight.device, target.embed_tokens.weight.dtype
    cfg, b, layer_ids = target.config, drafter.config.block_size, tuple(drafter.config.target_layer_ids)
    lens = [len(p) for p in prompts]
    tables, first = [], 0
    for n in lens:
        need = -(-(n + max_new_tokens + b + 1) // PAGE)
        tables.append(list(range(first, first + need)))
        first += need
    caches = [new_kv_cache(first, PAGE, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
              for _ in range(cfg.num_hidden_layers)]
    dcaches = drafter.make_kv_caches(first, PAGE, dtype)
    greedy = temperature < 1e-5
    meta = build_attention_metadata(lens, [0] * len(prompts), lens, tables, PAGE, device=device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden, aux = target(ids, pos, caches, meta, aux_layer_ids=layer_ids)
    drafter.add_context(aux, pos, meta.slot_mapping, dcaches)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    firsts = sample_next(target.compute_logits(hidden[last]), temperature, 1.0, None, None).tolist()
    res = SpecResult([[t] for t in firsts])
    starts = list(lens)
    active = [r for r in range(len(prompts)) if firsts[r] not in stop_ids and max_new_tokens > 1]
    conf_rows: list[Tensor] = []
    params = SamplingParams(temperature=temperature)
    verifier = Verifier()
    while active:
        anchors = torch.tensor([res.outputs[r][-1] for r in active], device=device)
        act_starts = [starts[r] for r in active]
        act_tables = [tables[r] for r in active]
        sampling = SamplingMetadata.build([params] * len(active), [seed * 100003 + r for r in active],
                                          [res.outputs[r] for r in active], cfg.vocab_size, device,
                                          attempts=[len(res.outputs[r]) for r in active])
        draft = drafter.propose(DraftBatch(anchors, torch.tensor(act_starts, device=device), max(act_starts),
                                           act_tables, PAGE, dcaches, sampling, (False,) * len(active)))
        verify_ids = torch.cat((anchors[:, None], draft.token_ids), 1)  # [R, B+1]
        meta = build_attention_metadata([b + 1] * len(active), act_starts, [s + b + 1 for s in act_starts],
                                        act_tables, PAGE, device=device)
        v_pos = torch.tensor(act_starts, device=device)[:, None] + torch.arange(b + 1, device=device)
        hidden, aux = target(verify_ids.flatten(), v_pos.flatten(), caches, meta, aux_layer_ids=layer_ids)
        logits = target.compute_logits(hidden)  # [R * (B+1), V]
        q = None if draft.draft_probs is None else draft.draft_probs.flatten(0, 1)  # [R * B, V']
        one_hot = torch.zeros(len(active) * b, dtype=torch.bool, device=device)
        out = verifier.verify(VerifyInput(
            tuple(str(r) for r in active), logits, RaggedDrafts(draft.token_ids.flatten(), (b,) * len(active)),
            DraftProbs(q, one_hot), sampling, torch.tensor(act_starts, device=device) + 1,
            [res.outputs[r] for r in active]))
        if draft.confidences is not None:
            conf_rows.append(_raw_conf_logits(drafter, draft.confidences, greedy))
        accepted = out.num_accepted.tolist()
        emitted = emitted_tokens(out.token_ids.tolist(), accepted)
        ctx_rows, ctx_pos, ctx_slots, still = [], [], [], []
        for i, r in enumerate(active):
            a = accepted[i]
            toks = emitted[i][:a + 1]
            stop_at = next((j for j, t in enumerate(toks) if t in stop_ids), None)
            n_eff = b if stop_at is None or stop_at >= a else stop_at + 1
            kept = toks if stop_at is None else toks[:stop_at + 1]
            res.accept_lengths.append(len(kept))
            res.num_drafted.append(n_eff)
            res.num_accepted.append(min(a, n_eff))
            room = max_new_tokens - len(res.outputs[r])
            res.outputs[r].extend(kept[:room])
            if stop_at is not None or len(kept) >= room:
                continue
            ctx_rows.extend(i * (b + 1) + j for j in range(a + 1))
            ctx_pos.extend(range(starts[r], starts[r] + a + 1))
            ctx_slots.extend(_slots(tables[r], range(starts[r], starts[r] + a + 1)))
            starts[r] += a + 1
            still.append(r)
        if ctx_rows:
            drafter.add_context(aux[torch.tensor(ctx_rows, device=device)], torch.tensor(ctx_pos, device=device),
                                torch.tensor(ctx_slots, device=device), dcaches)
        active = still
    if conf_rows:
        res.conf_logits = torch.cat(conf_rows)
    return res
