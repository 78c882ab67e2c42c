"""One DP-SGD training step against a non-private step and Opacus (hooks and ghost clipping, when
importable), same model, data and batch, measured in one run.

    python benchmarks/bench_dpsgd.py                      # CPU: small LM-shaped model
    python benchmarks/bench_dpsgd.py --device cuda --model llama --layers 8 --hidden 512 --batch 32 --seq 256
    python benchmarks/bench_dpsgd.py --device cuda --model gpt2 --layers 12 --hidden 768 --vocab 50257
    python benchmarks/bench_dpsgd.py --device cuda --model llama --layers 8 --hidden 512 --batch 32 --seq 256 --autocast

Models: ``mlp`` (token embedding -> n x [LayerNorm, MLP d -> 4d -> d with residual] -> LayerNorm ->
head), or Hugging Face ``llama`` / ``gpt2`` causal LMs built from configs (no downloads); a per-example
token-mean cross entropy; ``--autocast``: fp32 parameters, forward passes under bf16 autocast. Prints median step time and the step's peak memory, model and optimizer state
included (CUDA: the allocator's peak; CPU: live tensor storage, from PyTorch's memory profiler), as ratios
to the non-private step. A peer that cannot run a model (Opacus has
no per-sample rule for some HF modules) is reported as failed.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from dpkd import privacy
from timing import measure, profile_summary


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class LM(torch.nn.Module):
    def __init__(self, vocab, d, n_layers):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.Sequential(*[Block(d) for _ in range(n_layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.emb(ids))))


def make_model(kind: str, vocab: int, d: int, n_layers: int, seq: int) -> torch.nn.Module:
    if kind == "mlp":
        return LM(vocab, d, n_layers)
    import transformers

    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(8 * d / 3) // 64 * 64,
                                          num_hidden_layers=n_layers, num_attention_heads=max(1, d // 64),
                                          max_position_embeddings=seq, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=max(1, d // 64),
                                         n_positions=seq)
        model = transformers.GPT2LMHeadModel(config)

    class Logits(torch.nn.Module):  # ids -> logits, like LM
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            # Per-example position ids: with HF's default [1, T] ids the position embedding's gradient is
            # summed over the batch before any hook sees it, and dpkd refuses it.
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return self.lm(input_ids=ids, position_ids=positions).logits
    return Logits(model)


def per_example_loss(logits, labels):
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return ce.mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["mlp", "llama", "gpt2"], default="mlp")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also print where the non-private and dpkd steps spend time")
    ap.add_argument("--autocast", action="store_true", help="forward passes under bf16 autocast (fp32 parameters)")
    args = ap.parse_args()
    dev = args.device

    def forward(model):
        with torch.autocast(dev, dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext():
            return model(ids).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)

    def fresh():
        torch.manual_seed(0)
        return make_model(args.model, args.vocab, args.hidden, args.layers, args.seq).to(dev).train()

    def non_private():
        model = fresh()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            per_example_loss(forward(model), labels).mean().backward()
            opt.step()
            opt.zero_grad()  # in the step: the memory profiler sees the gradients freed
        return step

    def dpkd_step():
        model = fresh()
        model, opt = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=args.batch, sample_rate=0.01)

        def step():
            per_example_loss(forward(model), labels).sum().backward()
            opt.step()
            opt.zero_grad()  # in the step: the memory profiler sees the gradients freed
        return step

    def run(make):
        step = make()
        return measure(step, dev, args.repeat, absolute=True, cpu_memory=True)

    rows = [("non-private", *run(non_private)), ("dpkd", *run(dpkd_step))]
    if args.profile:
        for name, make in (("non-private", non_private), ("dpkd", dpkd_step)):
            print(f"--- {name} step profile ---\n{profile_summary(make(), dev)}")
    try:
        import opacus
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        def opacus_ghost_step():
            model = fresh()
            gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
            opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                                  max_grad_norm=1.0, expected_batch_size=args.batch)
            criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss())

            def step():
                opt.zero_grad()
                logits = forward(gsm)
                criterion(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), shape=logits.shape).backward()
                opt.step()
            return step

        def opacus_step():
            model = fresh()
            gsm = opacus.GradSampleModule(model)
            opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                                max_grad_norm=1.0, expected_batch_size=args.batch)

            def step():
                opt.zero_grad()
                per_example_loss(forward(gsm), labels).mean().backward()
                opt.step()
            return step

        for name, make in (("Opacus hooks", opacus_step), ("Opacus ghost", opacus_ghost_step)):
            try:
                rows.append((name, *run(make)))
            except Exception as e:  # a peer failing (unsupported module, OOM) must not hide the others
                print(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    except ImportError:
        pass
    base, base_mb = rows[0][1], rows[0][2]
    print(f"{dev}: {args.model}, {args.layers} layers, d={args.hidden}, V={args.vocab}, B={args.batch}, T={args.seq}"
          + (", bf16 autocast" if args.autocast else ""))
    for name, ms, mb in rows:
        print(f"{name:<14} {ms:9.1f} ms  x{ms / base:5.2f}"
              + (f"  peak {mb:8.0f} MB  x{mb / base_mb:5.2f}" if mb == mb else "  peak n/a"))


if __name__ == "__main__":
    main()
