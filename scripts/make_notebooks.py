"""Writes notebooks/*.ipynb from the cells below and executes them, so the committed copies show their
outputs (CI executes them again: tests/python/test_notebooks_and_demo.py)."""

from pathlib import Path

import nbclient
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

QUICKSTART = [
    new_markdown_cell("# dpkd quickstart\nLosses, token statistics, selection, accounting and one DP-SGD step, "
                      "on random tensors and a toy model (CPU, seconds)."),
    new_code_cell("import torch\nimport dpkd\nfrom dpkd import accounting, privacy, select\n"
                  "torch.manual_seed(0)\n"
                  "student = torch.randn(2, 16, 1000, requires_grad=True)\nteacher = torch.randn(2, 16, 1000)\n"
                  "labels = torch.randint(0, 1000, (2, 16))"),
    new_markdown_cell("## Fused distillation losses and per-token statistics"),
    new_code_cell("loss, stats = dpkd.generalized_jsd(student, teacher, beta=0.5, temperature=2.0, labels=labels,\n"
                  "                                   return_stats=True)\nloss.backward()\n"
                  "print(float(loss), stats.student_entropy.shape, float(stats.divergence.mean()))"),
    new_markdown_cell("## Token selection (per sequence)"),
    new_code_cell("tip = select.tip(stats.student_entropy, stats.divergence, quadrant='q1_or_q2')\n"
                  "print('selected', tip.fraction())\n"
                  "loss = dpkd.forward_kl(student, teacher, select=lambda st, valid: "
                  "select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid))\nprint(float(loss))"),
    new_markdown_cell("## Privacy accounting"),
    new_code_cell("sigma = accounting.calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000)\n"
                  "print('sigma', sigma, 'epsilon', accounting.epsilon(noise_multiplier=sigma, sample_rate=0.01, "
                  "steps=1000, delta=1e-5))"),
    new_markdown_cell("## One DP-SGD step"),
    new_code_cell("model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))\n"
                  "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                  "model, opt = privacy.make_private(model, opt, noise_multiplier=sigma, max_grad_norm=1.0,\n"
                  "                                  expected_batch_size=32, sample_rate=0.01)\n"
                  "x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))\n"
                  "opt.zero_grad()\n"
                  "torch.nn.functional.cross_entropy(model(x), y, reduction='none').sum().backward()\nopt.step()\n"
                  "print('per-example norms', opt.last_per_example_norms[:4], 'epsilon', "
                  "opt.accountant.get_epsilon(1e-5))"),
]

WALKTHROUGH = [
    new_markdown_cell("# DP-OPD walk-through\nThe demo's corpus and models at a reduced size: pre-train a "
                      "teacher and a student on public data, then adapt the student on private data with DP-OPD "
                      "and DP fine-tuning at the same epsilon, and plot what happens."),
    new_code_cell("import math, copy, torch\nimport matplotlib.pyplot as plt\n"
                  "from dpkd import accounting, opd, select\n"
                  "from dpkd.demo import pretrain, perplexity\nfrom dpkd.demo.corpus import make_corpus, "
                  "CONTINUATION_LEN\nfrom dpkd.demo.model import TinyCausalLM\n"
                  "torch.manual_seed(0)\ncorpus = make_corpus(n_public=1500, n_private=600, n_test=200)\n"
                  "(pub_p, pub_c), (priv_p, priv_c), (test_p, test_c) = (corpus.splits[k] for k in "
                  "('public', 'private', 'test'))\n"
                  "teacher = pretrain(TinyCausalLM(len(corpus.vocab), 64, 2), pub_p, pub_c, 250, seed=0)\n"
                  "student0 = pretrain(TinyCausalLM(len(corpus.vocab), 32, 2), pub_p, pub_c, 30, seed=1)\n"
                  "print('teacher ppl', perplexity(teacher, test_p, test_c), 'student ppl', "
                  "perplexity(student0, test_p, test_c))"),
    new_markdown_cell("## Training curves at epsilon = 2"),
    new_code_cell("curves = {}\nfor method in ['dp_opd', 'dp_sft']:\n"
                  "    student = copy.deepcopy(student0)\n"
                  "    cfg = opd.OPDConfig(method=method, steps=60, expected_batch_size=48, lr=2e-3, max_grad_norm=0.1,\n"
                  "                        max_new_tokens=CONTINUATION_LEN, target_epsilon=2.0)\n"
                  "    trainer = opd.OPDTrainer(student, teacher, priv_p, priv_c, cfg)\n"
                  "    points = []\n"
                  "    for step in range(cfg.steps):\n"
                  "        m = trainer.step()\n"
                  "        if step % 10 == 9:\n"
                  "            points.append((m['step'], m['epsilon'], perplexity(student, test_p, test_c)))\n"
                  "    curves[method] = points\n"
                  "fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
                  "for method, pts in curves.items():\n"
                  "    a.plot([p[0] for p in pts], [p[1] for p in pts], label=method)\n"
                  "    b.plot([p[0] for p in pts], [p[2] for p in pts], label=method)\n"
                  "a.set(xlabel='step', ylabel='epsilon spent'); b.set(xlabel='step', ylabel='held-out perplexity')\n"
                  "a.legend(); b.legend(); fig.tight_layout()"),
    new_markdown_cell("## TIP quadrants: student entropy against teacher-student divergence"),
    new_code_cell("from dpkd import token_stats\n"
                  "seqs = opd.sample_continuations(student0, priv_p[:64], num_samples=1, max_new_tokens=CONTINUATION_LEN)\n"
                  "with torch.no_grad():\n"
                  "    st = token_stats(student0(seqs[:, :-1]), teacher(seqs[:, :-1]), divergence='jsd')\n"
                  "h, d = st.student_entropy[:, 2:].flatten(), st.divergence[:, 2:].flatten()\n"
                  "q = select.tip(h[None], d[None], quadrant='q1_or_q2', fraction=0.3).values[0]\n"
                  "fig, ax = plt.subplots(figsize=(5, 4))\n"
                  "ax.scatter(h[~q], d[~q], s=4, alpha=0.4, label='not selected')\n"
                  "ax.scatter(h[q], d[q], s=4, alpha=0.6, label='TIP Q1 or Q2')\n"
                  "ax.set(xlabel='student entropy', ylabel='JSD(teacher, student)'); ax.legend()\n"
                  "print('selected fraction', float(q.float().mean()))"),
]

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "notebooks"
    for name, cells in (("quickstart.ipynb", QUICKSTART), ("dp_opd_walkthrough.ipynb", WALKTHROUGH)):
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(out)}}).execute()
        nbformat.write(nb, out / name)
        print("wrote", out / name)
