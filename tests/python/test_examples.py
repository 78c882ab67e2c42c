"""examples/: the Hugging Face Trainer recipe trains exactly as a plain DP-SGD loop over the same batches."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from dpkd import privacy  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "hf_trainer", pathlib.Path(__file__).parents[2] / "examples" / "hf_trainer.py")
hf_trainer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_trainer)


def test_the_trainer_recipe_equals_a_plain_dp_sgd_loop(tmp_path):
    transformers.logging.set_verbosity_error()
    # C so large that nothing is clipped: a loss the Trainer divided by the accumulation steps would show.
    kw = dict(examples=32, expected_batch_size=8, accumulation=2, noise_multiplier=0.0, max_grad_norm=1e4, epochs=1)
    trainer = hf_trainer.tiny_run(str(tmp_path), optim="sgd", **kw)
    assert trainer.state.global_step == 4 and len(trainer.dp_optimizer.accountant) == 4

    # The same model, data and batches through make_private by hand: micro-batches of one Poisson batch each.
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 64, (int(n),), generator=g)} for n in torch.randint(4, 13, (32,), generator=g)]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=0.0,
                                     max_grad_norm=1e4, expected_batch_size=8, dataset_size=32,
                                     generator=torch.Generator().manual_seed(2))
    loader = privacy.poisson_loader(data, 8, generator=torch.Generator().manual_seed(3),
                                    collate_fn=hf_trainer.right_padded, micro_batches=2)
    for i, batch in enumerate(loader):
        if batch["input_ids"].shape[0]:
            hf_trainer.per_example_loss(model, batch).sum().backward()
            dp.accumulate()
        if i % 2 == 1:
            dp.step()
            dp.zero_grad()
    assert dp.last_per_example_norms.max() < 1e4
    for a, b in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
