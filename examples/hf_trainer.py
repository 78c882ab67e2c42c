"""DP-SGD with dpkd inside the Hugging Face Trainer: a subclass, and a tiny run.

    python examples/hf_trainer.py

What the subclass takes care of, and why:
- the loss is per example (each sequence's token mean), never a Hugging Face model's own loss with ``labels=``, which
  divides by the tokens of the whole batch, so one example's length changes the others' gradients (not DP);
- ``loss_is_scaled_for_ga``: the Trainer must not divide the loss by the accumulation steps (that would scale every
  per-example gradient before clipping: the same epsilon, but a clipping norm k times larger in effect);
- each Poisson batch (of the logical size) is split into the accumulation steps' micro-batches
  (``poisson_loader(micro_batches=k)``): k independent Poisson batches per step would hold some examples twice;
- ``optimizer.accumulate()`` after each micro-batch's backward (on the DP optimizer inside accelerate's wrapper);
- an empty micro-batch skips the model (Hugging Face models cannot run zero examples); the step still adds noise;
- the Trainer neither clips (``max_grad_norm=0``) nor logs a gradient norm: before the DP step, ``.grad`` holds raw,
  non-private gradients of the norm layers only.
"""

from __future__ import annotations

import torch
import transformers

from dpkd import privacy


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B]: each sequence's mean cross entropy over its labelled next tokens (labels shifted as Hugging Face does)."""
    ids, labels = batch["input_ids"], batch["labels"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # [B, T]: one row per example
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions).logits
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                           reduction="none")
    return ce.sum(1) / (targets != -100).sum(1).clamp(min=1)


class DPTrainer(transformers.Trainer):
    """``dp_kwargs`` go to dpkd.privacy.make_private (noise_multiplier, max_grad_norm, expected_batch_size of one
    optimizer step, ...); ``sampler_generator`` seeds the Poisson sampling."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, dp_kwargs: dict, sampler_generator: torch.Generator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:
            raise ValueError("set TrainingArguments(max_grad_norm=0): dpkd clips each example's gradient")
        self.dp_kwargs, self.sampler_generator = dict(dp_kwargs), sampler_generator

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            self.model.train()  # from_pretrained returns a model in eval mode
            self.model, self.optimizer = privacy.make_private(self.model, self.optimizer,
                                                              dataset_size=len(self.train_dataset), **self.dp_kwargs)
        return self.optimizer

    @property
    def dp_optimizer(self) -> privacy.DPOptimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def _get_grad_norm(self, model, grad_norm=None):  # transformers 5's hook for the logged grad_norm
        return None

    def get_train_dataloader(self):
        # Made before the DP optimizer (Trainer builds the loader first): its batch size and secure mode from dp_kwargs
        return privacy.poisson_loader(self.train_dataset, self.dp_kwargs["expected_batch_size"],
                                      secure_mode=self.dp_kwargs.get("secure_mode", False),
                                      generator=self.sampler_generator, collate_fn=self.data_collator,
                                      micro_batches=self.args.gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per_example = per_example_loss(model, inputs)
        mean = self.dp_kwargs.get("loss_reduction") == "mean" or not model.training  # evaluation reports the mean
        loss = per_example.mean() if mean else per_example.sum()
        return (loss, {"per_example_loss": per_example.detach()}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs["input_ids"].shape[0] == 0:
            return torch.zeros((), device=self.args.device)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.dp_optimizer.accumulate()
        return loss


def right_padded(items: list[dict[str, torch.Tensor]], pad: int = 0) -> dict[str, torch.Tensor]:
    """Collate sequences of different lengths: right padding, labels -100 on it."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, it in enumerate(items):
        ids[row, :len(it["input_ids"])], attention[row, :len(it["input_ids"])] = it["input_ids"], 1
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}


def tiny_run(output_dir: str, *, examples: int = 64, expected_batch_size: int = 8, accumulation: int = 2,
             noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, epochs: int = 1,
             optim: str = "adamw_torch") -> DPTrainer:
    """A two-layer Llama from a config on random sequences of 4-12 tokens."""
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 64, (int(n),), generator=g)} for n in torch.randint(4, 13, (examples,), generator=g)]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))
    args = transformers.TrainingArguments(output_dir=output_dir, num_train_epochs=epochs, learning_rate=1e-3,
                                          max_grad_norm=0.0, gradient_accumulation_steps=accumulation, optim=optim,
                                          lr_scheduler_type="constant", report_to="none", save_strategy="no",
                                          use_cpu=True, logging_steps=10**6, disable_tqdm=True)
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=right_padded,
                        dp_kwargs=dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                       expected_batch_size=expected_batch_size,
                                       generator=torch.Generator().manual_seed(2)),
                        sampler_generator=torch.Generator().manual_seed(3))
    trainer.train()
    return trainer


if __name__ == "__main__":
    import tempfile

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        t = tiny_run(out, examples=256, expected_batch_size=16, epochs=2)
        dp = t.dp_optimizer
        print(f"{t.state.global_step} steps, accountant {len(dp.accountant)} steps, "
              f"epsilon(1e-5) = {dp.accountant.get_epsilon(1e-5):.3f}")
