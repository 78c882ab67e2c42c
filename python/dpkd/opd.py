"""DP-OPD: differentially private on-policy distillation, and its baselines, as a step-by-step trainer.

Each step takes a Poisson-sampled logical batch of private prompts and
  1. samples ``num_samples`` continuations per prompt from the student (no gradient, DP hooks inactive),
  2. scores prompt + continuation with the frozen teacher under ``torch.no_grad()``,
  3. computes the distillation loss on continuation tokens only (optionally on selected tokens, per
     sequence), as one loss per example: the token mean of each continuation, averaged over the
     example's continuations,
  4. takes a DP-SGD step and charges the accountant.
The same trainer runs the baselines: ``dp_sft`` (DP fine-tuning on ground-truth continuations),
``dp_offpolicy_kd`` (teacher targets on ground-truth continuations), ``kd`` (DP-OPD without privacy)
and ``sft`` (fine-tuning without privacy: what memorisation looks like).
Models are Hugging Face causal LMs or any nn.Module mapping token ids [B, T] to logits [B, T, V].
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import time
import warnings
from typing import Any, Callable, Literal, Sequence

import torch

from . import accounting, fused_linear, losses, privacy
from . import select as sel

Method = Literal["dp_opd", "dp_sft", "dp_offpolicy_kd", "kd", "sft"]
METHODS: tuple[str, ...] = ("dp_opd", "dp_sft", "dp_offpolicy_kd", "kd", "sft")

__all__ = ["METHODS", "OPDConfig", "OPDTrainer", "continuation_losses", "sample_continuations"]


@dataclasses.dataclass
class OPDConfig:
    method: Method = "dp_opd"
    divergence: losses.Divergence = "jsd"
    beta: float = 0.5
    loss_temperature: float = 1.0
    num_samples: int = 1                 # continuations per prompt (one example = a prompt and all of them)
    max_new_tokens: int = 16
    sample_temperature: float = 1.0
    top_p: float = 1.0
    # A fraction of examples (drawn per example) train on the ground truth instead of student samples: 1 - lambda of
    # GKD / TRL's GKDConfig(lmbda=...), whose lambda is the on-policy fraction (drawn per batch there).
    ground_truth_fraction: float = 0.0
    expected_batch_size: int = 8
    steps: int = 100
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated from target_epsilon
    target_epsilon: float | None = 2.0
    delta: float | None = None             # None: 1 / N^2
    accountant: str = "rdp"                # or "pld": tighter, so a smaller sigma for the same target
    # The end-of-sequence id (None: a Hugging Face student's own); tokens after a continuation's first EOS carry no
    # loss, sampled or ground truth (padding after an EOS is left out with them).
    eos_token_id: int | None = None
    # Prompts of different lengths: left-padded to one length with this id, which Hugging Face models' attention masks
    # out (a leading run of it only; plain modules read it as a token). None: prompts are all of one length.
    pad_token_id: int | None = None
    secure_mode: bool = False
    seed: int = 0
    # Logits of different widths: the extra columns count as probability 0 (an infinite forward KL where the
    # teacher puts mass on them, an infinite reverse KL where the student does). Off: such a pair is an error.
    allow_vocab_mismatch: bool = False
    # The distillation loss from the two models' last hidden states and output layers (dpkd.fused_linear_distill_loss):
    # no [B, T, V] logits. Hugging Face causal LMs whose logits are their output layer on their base model's last
    # hidden state (checked at construction; Gemma's final softcap taken along). A select rule costs a first pass over
    # both heads (the statistics it reads), or over the student's alone with select_reads="student" (a rule that reads
    # only the student's statistics: its entropy, its label log-prob).
    fused_head: bool = False
    select_reads: str = "all"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_samples", "max_new_tokens", "expected_batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.sample_temperature > 0.0:
            raise ValueError(f"sample_temperature must be > 0, got {self.sample_temperature}")
        if self.divergence not in losses.DIVERGENCES:
            raise ValueError(f"divergence must be one of {losses.DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:  # checked here, not at the first step's loss after sampling
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not self.loss_temperature > 0.0:
            raise ValueError(f"loss_temperature must be > 0, got {self.loss_temperature}")
        accounting.check_accountant(self.accountant)
        if self.fused_head and self.method in ("dp_sft", "sft"):
            raise ValueError(f"fused_head distils from a teacher; method {self.method!r} has none")
        if self.select_reads not in ("all", "student"):
            raise ValueError(f"select_reads must be 'all' or 'student', got {self.select_reads!r}")
        if self.select_reads == "student" and not self.fused_head:
            raise ValueError("select_reads='student' applies to fused_head=True (the logits path forms both models' "
                             "statistics anyway)")
        if not 0.0 <= self.ground_truth_fraction <= 1.0:
            raise ValueError(f"ground_truth_fraction must be in [0, 1], got {self.ground_truth_fraction}")

    @property
    def private(self) -> bool:
        return self.method not in ("kd", "sft")

    @property
    def on_ground_truth(self) -> bool:
        return self.method in ("dp_sft", "dp_offpolicy_kd", "sft")


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids from the first attended token (per-example DP needs them per row, not broadcast)."""
    return (attention.long().cumsum(1) - 1).clamp(min=0)


def _logits(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Logits of an HF causal LM (explicit [B, T] position ids: per-example DP needs them) or of a plain module."""
    if hasattr(model, "config") and hasattr(model, "generate"):
        return model(input_ids=ids, attention_mask=attention, position_ids=_positions(attention)).logits
    return model(ids)


def _head_parts(model: torch.nn.Module):
    """(hidden states of ids under attention, output layer, final softcap) of a Hugging Face causal LM (or of the one a
    PEFT model wraps: its adapters stay in the layers), or None."""
    if callable(getattr(model, "get_base_model", None)):  # a PeftModel: its base_model runs the whole causal LM
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not (hasattr(model, "config") and isinstance(head, torch.nn.Linear) and isinstance(base, torch.nn.Module)
            and base is not model):
        return None

    def hidden(ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return base(input_ids=ids, attention_mask=attention, position_ids=_positions(attention)).last_hidden_state
    return hidden, head, getattr(model.config, "final_logit_softcapping", None)


def _check_head_parts(name: str, model: torch.nn.Module, ids: torch.Tensor) -> None:
    """OPDConfig(fused_head=True): the model's logits must be its output layer on its base model's last hidden state
    (softcapped where its config says so); a model that scales or shifts them otherwise is refused."""
    parts = _head_parts(model)
    if parts is None:
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        why = (f" (its output layer is {type(head).__module__}.{type(head).__name__}: a PEFT adapter on lm_head is "
               "not supported with fused_head)" if head is not None and not isinstance(head, torch.nn.Linear) else "")
        raise ValueError(f"fused_head needs Hugging Face causal LMs with an nn.Linear output layer; the {name} "
                         f"({type(model).__name__}) is not one{why}")
    hidden, head, cap = parts
    attention = torch.ones_like(ids)
    training = model.training
    model.eval()  # no dropout draw
    with torch.no_grad():
        z = head(hidden(ids, attention)).float()
        if cap:
            z = cap * torch.tanh(z / cap)
        ref = _logits(model, ids, attention)
    model.train(training)
    if z.shape != ref.shape:  # e.g. a PEFT prompt-tuning model, whose logits cover its virtual tokens too
        raise ValueError(f"fused_head: the {name}'s logits have shape {tuple(ref.shape)}, its output layer on its base "
                         f"model's last hidden state {tuple(z.shape)}; use fused_head=False")
    # The same ops give the same values up to the softcap's order of rounding: a few units of the logits' precision,
    # relative to the largest logit (a scale of 1.0005 is 500 fp32 units away and refused).
    ref, tol = ref.float(), 8 * torch.finfo(ref.dtype).eps
    if not float((z - ref).abs().max()) <= tol * float(ref.abs().max()):
        raise ValueError(f"fused_head: the {name}'s logits are not its output layer on its base model's last hidden "
                         f"state (max difference {float((z - ref).abs().max()):.3g}); use fused_head=False")


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) > top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def eos_ids(model: torch.nn.Module, eos_token_id: int | None = None) -> list[int]:
    """The end-of-sequence ids: ``eos_token_id`` if given, else a Hugging Face model's (its generation config's, which
    may list several), else none."""
    if eos_token_id is not None:
        return [int(eos_token_id)]
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if found is None:
        found = getattr(getattr(model, "config", None), "eos_token_id", None)
    if found is None:
        return []
    return [int(i) for i in (found if isinstance(found, (list, tuple)) else [found])]


def prompt_attention(prompts: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """1 on the prompts' tokens, 0 on their left padding (``pad_token_id``; None: no padding)."""
    if pad_token_id is None:
        return torch.ones_like(prompts)
    pads = (prompts == pad_token_id).long().cumprod(1)  # padding is the leading run only: a pad id inside is a token
    return 1 - pads


def after_eos(continuations: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """bool [S, M]: the tokens after each row's first end-of-sequence token (the EOS itself is not after it)."""
    if not eos:
        return torch.zeros_like(continuations, dtype=torch.bool)
    is_eos = torch.isin(continuations, torch.tensor(eos, device=continuations.device))
    return (is_eos.long().cumsum(1) - is_eos.long()) > 0


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, *, num_samples: int, max_new_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0,
                         generator: torch.Generator | None = None, eos_token_id: int | None = None,
                         pad_token_id: int | None = None) -> torch.Tensor:
    """[B * num_samples, P + max_new_tokens] token ids: each prompt repeated, continued by sampling.

    Prompts are [B, P], shorter ones left-padded with ``pad_token_id`` (masked from a Hugging Face model's
    attention; a plain module reads them as tokens). Hugging Face models sample through ``generate`` (KV cache), seeded
    from ``generator`` without touching the global RNG; other modules by a loop over the full prefix. The
    end-of-sequence token is sampled like any other (never suppressed: the samples are the student's own
    distribution); a Hugging Face row that ends early is filled up with it, and what follows a row's first EOS
    (``eos_ids``) carries no loss in :func:`continuation_losses`.
    """
    was_training = model.training
    model.eval()
    seq = prompts.repeat_interleave(num_samples, 0)
    if hasattr(model, "generate") and hasattr(model, "config"):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
        devices = [seq.device] if seq.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            eos = eos_ids(model, eos_token_id)
            fill = eos[0] if eos else 0
            out = model.generate(input_ids=seq, attention_mask=prompt_attention(seq, pad_token_id), do_sample=True,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                                 pad_token_id=fill, **({"eos_token_id": eos} if eos else {}))
        model.train(was_training)
        short = seq.shape[1] + max_new_tokens - out.shape[1]  # every row stopped early
        return torch.nn.functional.pad(out, (0, short), value=fill) if short else out
    prompt_mask = prompt_attention(seq, pad_token_id)
    for _ in range(max_new_tokens):
        attention = torch.nn.functional.pad(prompt_mask, (0, seq.shape[1] - prompt_mask.shape[1]), value=1)
        logits = _logits(model, seq, attention)[:, -1].float() / temperature
        probs = _nucleus(logits, top_p).softmax(-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(seq.device)
        seq = torch.cat([seq, nxt], 1)
    model.train(was_training)
    return seq


def _embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of a model's input embedding (the token ids it can read): a Hugging Face model's, or a plain module's
    only nn.Embedding; None where that is not known (several embeddings: which one reads the ids?)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        return getattr(get(), "num_embeddings", None)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return embeddings[0].num_embeddings if len(embeddings) == 1 else None


def _continuation_tokens(student: torch.nn.Module, sequences: torch.Tensor, prompt_len: int, config: OPDConfig):
    """(inputs, targets, attention mask, which targets carry loss) of prompt + continuation sequences."""
    inputs, targets = sequences[:, :-1], sequences[:, 1:]
    attention = torch.ones_like(inputs)
    attention[:, :prompt_len] = prompt_attention(sequences[:, :prompt_len], config.pad_token_id)
    cont = torch.zeros_like(targets, dtype=torch.bool)
    # Positions whose next token is a continuation token up to and including its first end-of-sequence token.
    cont[:, prompt_len - 1:] = ~after_eos(sequences[:, prompt_len:], eos_ids(student, config.eos_token_id))
    return inputs, targets, attention, cont


def fused_continuation_loss(student: torch.nn.Module, teacher: torch.nn.Module, sequences: torch.Tensor,
                            prompt_len: int, config: OPDConfig, *,
                            select: Callable | None = None) -> tuple[torch.Tensor, float]:
    """:func:`continuation_losses`' per-example losses, summed (each example's continuations, ``num_samples``
    consecutive rows, averaged), from the models' hidden states and output layers: no [B, T, V] logits; and the
    selected fraction."""
    inputs, targets, attention, cont = _continuation_tokens(student, sequences, prompt_len, config)
    s_hidden, s_head, s_cap = _head_parts(student)
    t_hidden, t_head, t_cap = _head_parts(teacher)
    with torch.no_grad():
        h_t = t_hidden(inputs, attention)
    tokens = cont.sum(1, keepdim=True).clamp(min=1)
    weights = cont / (tokens * config.num_samples)
    rule, seen = _checked_rule(select, config)
    loss = fused_linear.fused_linear_distill_loss(
        s_hidden(inputs, attention), s_head.weight, h_t, t_head.weight, student_bias=s_head.bias,
        teacher_bias=t_head.bias, student_softcap=s_cap, teacher_softcap=t_cap, divergence=config.divergence,
        beta=config.beta, temperature=config.loss_temperature, labels=torch.where(cont, targets, -100),
        weights=weights.to(torch.float32), reduction="sum", allow_vocab_mismatch=config.allow_vocab_mismatch,
        select=rule, select_reads=config.select_reads,
        check_finite=not config.private)  # also with a frozen head, which the fused loss does not see as private
    return loss, float(seen["w"][cont].mean()) if select is not None else 1.0


def _checked_rule(select: Callable | None, config: OPDConfig) -> tuple[Callable | None, dict]:
    """``select`` checked as OPD takes it (a Selection back; sequence scope under DP), and where the weights it chose
    are left for the selected fraction."""
    seen: dict[str, torch.Tensor] = {}
    if select is None:
        return None, seen

    def rule(stats, valid):
        chosen = select(stats, valid)
        if not isinstance(chosen, sel.Selection):
            raise TypeError(f"a select rule returns a dpkd.select.Selection, got {type(chosen).__name__}")
        if config.private:
            chosen.check_private()  # one example's selection may depend on that example alone
        seen["w"] = chosen.weights()
        return chosen
    return rule, seen


def continuation_losses(student: torch.nn.Module, teacher: torch.nn.Module | None, sequences: torch.Tensor,
                        prompt_len: int, config: OPDConfig, *, hard_labels: bool = False,
                        select: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-sequence losses [S] over continuation tokens only, the per-token losses [S, T-1] (0 outside
    the continuation) and the selected fraction. ``hard_labels``: cross entropy to the sequence's own
    tokens (DP fine-tuning) instead of the teacher; a ``select`` rule then sees the student's statistics in the
    teacher's fields too (divergence 0): SHRED's surprisal, the student's entropy."""
    inputs, targets, attention, cont = _continuation_tokens(student, sequences, prompt_len, config)
    s_logits = _logits(student, inputs, attention)
    labels = torch.where(cont, targets, torch.full_like(targets, -100))
    rule, weights_seen = _checked_rule(select, config)

    if hard_labels:
        per_token = torch.nn.functional.cross_entropy(s_logits.transpose(1, 2).float(), labels, reduction="none",
                                                      ignore_index=-100)
        fraction = 1.0
        if select is not None:
            own = s_logits.detach()
            weights = rule(losses.token_stats(own, own, labels=labels), labels != -100).weights()
            per_token = per_token * weights
            fraction = float(weights[cont].mean())
    else:
        with torch.no_grad():
            t_logits = _logits(teacher, inputs, attention).to(s_logits.dtype)
        if s_logits.shape[-1] != t_logits.shape[-1] and not config.allow_vocab_mismatch:
            raise ValueError(f"student logits have {s_logits.shape[-1]} columns and teacher logits "
                             f"{t_logits.shape[-1]}: set OPDConfig(allow_vocab_mismatch=True) to treat the extra "
                             "columns as probability 0")

        per_token = losses.distill_loss(s_logits, t_logits, divergence=config.divergence, beta=config.beta,
                                        temperature=config.loss_temperature, labels=labels, reduction="none",
                                        allow_vocab_mismatch=config.allow_vocab_mismatch,
                                        select=rule, check_finite=not config.private)
        fraction = float(weights_seen["w"][cont].mean()) if select is not None else 1.0
    per_seq = (per_token * cont).sum(1) / cont.sum(1).clamp(min=1)
    return per_seq, per_token, fraction


class OPDTrainer:
    """Step-by-step trainer (``step()`` returns a metrics dict); ``train()`` runs the remaining steps.

    ``log_path``: each step's metrics appended as a CSV row (``.csv``) or a JSON line (null for NaN and infinity);
    appended, so that a resumed run continues its log. ``select``: a rule ``(TokenStats, valid) -> Selection`` on the
    continuation tokens; the per-sequence loss stays a mean over all continuation tokens, so a 50% selection about
    halves its scale (and its gradient's, against the clipping norm). ``optimizer``: the student's optimizer (default
    ``AdamW(lr=config.lr)`` over its trainable parameters; config.lr is then unused), e.g. SGD for an fp16 student,
    whose Adam state would overflow; a private method wraps it for DP-SGD, and an LR scheduler on it goes on working."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, prompts: torch.Tensor,
                 continuations: torch.Tensor | None, config: OPDConfig, *, select: Callable | None = None,
                 log_path: str | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config, self.select, self.log_path = config, select, log_path
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            mine = {id(p) for p in student.parameters() if p.requires_grad}
            if any(id(p) not in mine for group in optimizer.param_groups for p in group["params"]):
                raise ValueError("optimizer holds parameters that are not the student's trainable ones: only the "
                                 "student trains (and, under DP, only its parameters' gradients are clipped)")
        if teacher is student:
            raise ValueError("teacher is the student: OPD trains a student against a separate, frozen teacher (for "
                             "self-distillation call dpkd.distill_loss with teacher_grad=True yourself)")
        if continuations is not None and continuations.shape[0] != prompts.shape[0]:
            raise ValueError(f"prompts hold {prompts.shape[0]} examples and continuations {continuations.shape[0]}")
        self.student, self.teacher = student.train(), teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        elif config.method not in ("dp_sft", "sft"):
            raise ValueError(f"method {config.method!r} needs a teacher")
        if continuations is None and (config.on_ground_truth or config.ground_truth_fraction):
            raise ValueError(f"method {config.method!r} (or ground_truth_fraction > 0) needs ground-truth continuations")
        uses_truth = config.on_ground_truth or config.ground_truth_fraction > 0
        if uses_truth and continuations.shape[1] < config.max_new_tokens:
            raise ValueError(f"continuations have {continuations.shape[1]} tokens, fewer than max_new_tokens")
        # Checked once, here, on the data and the models' shapes: a check on each batch would raise, or not, with the
        # batch's examples.
        one = torch.ones(1, 1, dtype=torch.long, device=prompts.device)
        with torch.no_grad():
            width = _logits(student.eval(), one, one).shape[-1]  # the ids the student samples from (no dropout draw)
        student.train()
        for name, ids in (("prompts", prompts), ("continuations", continuations if uses_truth else None)):
            if ids is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < width:
                raise ValueError(f"{name} hold token ids in [{int(ids.min())}, {int(ids.max())}], outside the student's "
                                 f"vocabulary of {width} (its logits' width)")
        rows = _embedding_rows(teacher) if teacher is not None else None
        if rows is not None and config.method not in ("dp_sft", "sft") and width > rows:
            raise ValueError(f"the student can produce token ids up to {width - 1}, outside the teacher's vocabulary "
                             f"of {rows}: the teacher must read every token the student can produce (a shared "
                             "tokenizer)")
        if teacher is not None and config.method not in ("dp_sft", "sft") and not config.allow_vocab_mismatch:
            with torch.no_grad():
                teacher_width = _logits(teacher, one, one).shape[-1]
            if teacher_width != width:
                raise ValueError(f"student logits have {width} columns and teacher logits {teacher_width}: set "
                                 "OPDConfig(allow_vocab_mismatch=True) to treat the extra columns as probability 0")
        if config.fused_head:
            probe = prompts[:1]
            _check_head_parts("student", student, probe)
            _check_head_parts("teacher", teacher, probe)
        self.prompts, self.continuations = prompts, continuations
        n = prompts.shape[0]
        if config.expected_batch_size > n:  # as make_private: q = 1 with gradients divided by more than n
            raise ValueError(f"expected_batch_size ({config.expected_batch_size}) must be at most the number of "
                             f"prompts ({n})")
        self.sample_rate = config.expected_batch_size / n
        self.delta = config.delta if config.delta is not None else 1.0 / n**2
        sigma = config.noise_multiplier
        if config.private and sigma is None:
            if config.target_epsilon is None:
                raise ValueError("give noise_multiplier or target_epsilon")
            sigma = accounting.calibrate_noise(target_epsilon=config.target_epsilon, delta=self.delta,
                                               sample_rate=self.sample_rate, steps=config.steps,
                                               accountant=config.accountant)
        self.noise_multiplier = sigma if config.private else 0.0
        if config.private and sigma == 0.0 and config.target_epsilon is None:
            warnings.warn(f"method {config.method!r} with noise_multiplier=0 adds no noise: the run is not private "
                          "(its epsilon is infinite)", RuntimeWarning, stacklevel=2)
        # Training stops before a step would take epsilon past target_epsilon (with a calibrated sigma
        # that is exactly config.steps; with a given sigma possibly fewer).
        self.total_steps = config.steps
        self._affordable = None  # steps at this sigma and rate that the target affords, from zero
        if config.private and config.target_epsilon is not None:
            self._affordable = accounting.max_steps(
                target_epsilon=config.target_epsilon, delta=self.delta, noise_multiplier=sigma,
                sample_rate=self.sample_rate, accountant=config.accountant)
            self.total_steps = min(config.steps, self._affordable)
            if self.total_steps == 0:
                raise ValueError(f"noise_multiplier={sigma} spends more than target_epsilon={config.target_epsilon} "
                                 f"(delta={self.delta:.3g}, sample rate {self.sample_rate:.3g}) in a single step: "
                                 "raise noise_multiplier or target_epsilon, or leave noise_multiplier to calibration")
        self.generator = torch.Generator().manual_seed(config.seed)
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr)
        if config.private:
            _, self.optimizer = privacy.make_private(
                student, optimizer, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm,
                expected_batch_size=config.expected_batch_size, sample_rate=self.sample_rate,
                secure_mode=config.secure_mode,
                generator=None if config.secure_mode else torch.Generator().manual_seed(config.seed + 1),
                accountant=accounting.make_accountant(config.accountant))
        else:
            self.optimizer = optimizer
        self.steps_done = 0

    def budget_allows_step(self) -> bool:
        """Whether one more step keeps epsilon within the target: from the accountant's own history (a resumed run's
        included, whatever the noise it was spent at), not from a step count."""
        cfg = self.config
        if not (cfg.private and cfg.target_epsilon is not None):
            return True
        if self.steps_done >= self.total_steps:
            return False
        spent = self.optimizer.accountant
        if all((e.noise_multiplier, e.sample_rate) == (self.noise_multiplier, self.sample_rate) for e in spent.history):
            return len(spent) + 1 <= self._affordable  # epsilon grows with the count alone: no composition per step
        probe = copy.deepcopy(spent)
        probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return probe.get_epsilon(self.delta) <= cfg.target_epsilon

    @property
    def epsilon(self) -> float:
        if not self.config.private:
            return math.inf
        return self.optimizer.accountant.get_epsilon(self.delta)

    def _batch(self) -> torch.Tensor:
        """Poisson sampling of the examples (from os.urandom in secure mode)."""
        n = self.prompts.shape[0]
        if self.config.secure_mode:
            keep = torch.from_numpy(privacy.noise.secure_uniform(n)) < self.sample_rate
        else:
            keep = torch.rand(n, generator=self.generator) < self.sample_rate
        return keep.nonzero().flatten().to(self.prompts.device)

    def _sequences(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Prompt + continuation for each of the example's num_samples rows: sampled from the student, or the
        ground truth (the off-policy baselines, and a ground_truth_fraction of examples under GKD mixing)."""
        cfg = self.config
        prompts = self.prompts[rows]
        k, m = cfg.num_samples, cfg.max_new_tokens
        truth = None
        if cfg.on_ground_truth or cfg.ground_truth_fraction > 0:
            truth = torch.cat([prompts, self.continuations[rows][:, :m]], 1).repeat_interleave(k, 0)
        if cfg.on_ground_truth:
            return truth, prompts.shape[1]
        seqs = sample_continuations(self.student, prompts, num_samples=k, max_new_tokens=m,
                                    temperature=cfg.sample_temperature, top_p=cfg.top_p, generator=self.generator,
                                    eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        if cfg.ground_truth_fraction > 0:
            pick = (torch.rand(rows.numel(), generator=self.generator) < cfg.ground_truth_fraction)
            pick = pick.repeat_interleave(k).to(seqs.device)
            seqs[pick] = truth[pick]
        return seqs, prompts.shape[1]

    def step(self) -> dict[str, Any]:
        """One training step. Past ``total_steps`` of a run with a target epsilon it raises: that step would take
        epsilon past the target."""
        cfg, t0 = self.config, time.perf_counter()
        if not self.budget_allows_step():
            raise RuntimeError(f"the privacy budget is spent: another step would take epsilon from {self.epsilon:.4g} "
                               f"past target_epsilon={cfg.target_epsilon}")
        rows = self._batch()
        self.optimizer.zero_grad()
        loss_value, fraction, tokens = float("nan"), float("nan"), 0
        if rows.numel():  # an empty Poisson batch still takes a (noise-only) step
            seqs, p_len = self._sequences(rows)
            if cfg.private:
                self.optimizer.engine.rows_per_example = cfg.num_samples
            if cfg.fused_head:
                total, fraction = fused_continuation_loss(self.student, self.teacher, seqs, p_len, cfg,
                                                          select=self.select)
            else:
                per_seq, _, fraction = continuation_losses(self.student, self.teacher, seqs, p_len, cfg,
                                                           hard_labels=cfg.method in ("dp_sft", "sft"),
                                                           select=self.select)
                total = per_seq.view(rows.numel(), cfg.num_samples).mean(1).sum()
            total.backward()
            loss_value = float(total.detach()) / rows.numel()
            tokens = int(seqs.shape[0] * cfg.max_new_tokens)
        self.optimizer.step()
        self.steps_done += 1
        norms = getattr(self.optimizer, "last_per_example_norms", torch.zeros(0))
        metrics = {"step": self.steps_done, "loss": loss_value, "epsilon": self.epsilon, "batch": int(rows.numel()),
                   # positions processed (those after an EOS too), not only those that carry loss
                   "selected_fraction": fraction, "tokens_per_s": tokens / (time.perf_counter() - t0),
                   "norm_p50": float(norms.quantile(0.5)) if norms.numel() else float("nan"),
                   "norm_p90": float(norms.quantile(0.9)) if norms.numel() else float("nan")}
        if self.log_path:
            self._log(metrics)
        return metrics

    def _log(self, metrics: dict[str, Any]) -> None:
        """Append to the log: CSV when the path ends in .csv, else JSON lines."""
        path = self.log_path
        if path.endswith(".csv"):
            import csv
            import os

            new = not os.path.exists(path) or os.path.getsize(path) == 0
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(metrics))
                if new:
                    writer.writeheader()
                writer.writerow(metrics)
        else:  # JSON has no NaN or Infinity (a non-private run's epsilon, an empty batch's norms): null
            finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}
            with open(path, "a") as f:
                f.write(json.dumps(finite, allow_nan=False) + "\n")

    def train(self, *, progress: bool = True) -> list[dict[str, Any]]:
        """Runs the remaining steps (up to ``total_steps``: the target epsilon is never exceeded)."""
        remaining = range(self.steps_done, self.total_steps)
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        bar = tqdm(remaining, desc=self.config.method, disable=not progress) if tqdm else remaining
        history = []
        for _ in bar:
            if not self.budget_allows_step():  # a resumed run whose history was spent under other settings
                break
            m = self.step()
            history.append(m)
            if tqdm:
                bar.set_postfix(loss=f"{m['loss']:.3f}", eps=f"{m['epsilon']:.2f}")
        return history

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to go on as an uninterrupted one: the student, the optimizer (with the
        accountant and the noise generator), the sampling generator and torch's global generators (dropout, rules that
        draw from them)."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "steps_done": self.steps_done,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer_state = state["optimizer"]
        if ("accountant" in optimizer_state) != self.config.private:
            kind = "a private" if "accountant" in optimizer_state else "a non-private"
            raise ValueError(f"the checkpoint is {kind} run's, and method {self.config.method!r} is "
                             f"{'' if self.config.private else 'non-'}private: resume with the method it was saved with")
        if self.config.private and "noise_generator" in state:  # written before the DP optimizer held it
            optimizer_state = {**optimizer_state, "noise_generator": state["noise_generator"]}
        for key in ("generator", "torch_rng"):  # checked before anything loads
            if state.get(key) is not None:
                torch.Generator().set_state(torch.as_tensor(state[key]).cpu())
        self.optimizer.load_state_dict(optimizer_state)  # checks its own parts before it changes anything
        self.student.load_state_dict(state["student"])
        self.generator.set_state(torch.as_tensor(state["generator"]).cpu())  # the noise's: in the optimizer's state
        self.steps_done = state["steps_done"]
        if state.get("torch_rng") is not None:
            torch.set_rng_state(torch.as_tensor(state["torch_rng"]).cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in state["cuda_rng"]])
