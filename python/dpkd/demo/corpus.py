"""A small synthetic corpus, generated deterministically (no downloads): sentences of a toy world with
regular structure (each animal has its foods and places), split into public, private and held-out
private test parts, with secret canaries planted in the private part.

Every example is a fixed-length sequence: a 3-token prompt and a continuation padded with <eos>.
"""

from __future__ import annotations

import dataclasses
import random

import torch

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "rat", "elk", "yak", "ant"]
ADJECTIVES = ["small", "big", "old", "young", "quick", "lazy", "brown", "white"]
FOODS = ["fish", "bones", "berries", "mice", "nectar", "grass", "corn", "seeds", "cheese", "moss", "hay", "sugar"]
PLACES = ["barn", "forest", "meadow", "river", "hive", "field", "farm", "yard", "cellar", "valley", "hill", "nest"]
VERBS = ["eats", "likes", "finds"]
NAMES = ["anna", "ben", "cara", "dev", "eli", "fay"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIAL = ["<eos>", "the", "in", "near", "with", "my", "pin", "is", "saw", "a", "."]
PROMPT_LEN, CONTINUATION_LEN = 3, 8


@dataclasses.dataclass
class Corpus:
    vocab: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (prompts [N, 3], continuations [N, 8])
    canaries: list[list[str]]                               # secret digit strings planted in "private"
    canary_prompt: list[str]

    def encode(self, words: list[str]) -> list[int]:
        index = {w: i for i, w in enumerate(self.vocab)}
        return [index[w] for w in words]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] != "<eos>")


def _sentence(rng: random.Random) -> list[str]:
    a = rng.randrange(len(ANIMALS))
    food = FOODS[(a + rng.choice([0, 0, 0, 1])) % len(FOODS)]     # mostly its own food
    place = PLACES[(a + rng.choice([0, 0, 2])) % len(PLACES)]
    if rng.random() < 0.7:
        return ["the", rng.choice(ADJECTIVES), ANIMALS[a], rng.choice(VERBS), food, "in", "the", place, "."]
    return [rng.choice(NAMES), "saw", "a", ANIMALS[a], "near", "the", place, "."]


def make_corpus(*, n_public: int = 3000, n_private: int = 1200, n_test: int = 300, n_canaries: int = 2,
                canary_repeats: int = 8, seed: int = 0) -> Corpus:
    rng = random.Random(seed)
    vocab = SPECIAL + ANIMALS + ADJECTIVES + FOODS + PLACES + VERBS + NAMES + DIGITS
    vocab = list(dict.fromkeys(vocab))
    index = {w: i for i, w in enumerate(vocab)}
    canary_prompt = ["my", "pin", "is"]
    canaries = [[rng.choice(DIGITS) for _ in range(4)] for _ in range(n_canaries)]

    def encode(sentences):
        rows = []
        for s in sentences:
            s = s + ["<eos>"] * (PROMPT_LEN + CONTINUATION_LEN - len(s))
            rows.append([index[w] for w in s[:PROMPT_LEN + CONTINUATION_LEN]])
        t = torch.tensor(rows, dtype=torch.long)
        return t[:, :PROMPT_LEN], t[:, PROMPT_LEN:]

    public = [_sentence(rng) for _ in range(n_public)]
    private = [_sentence(rng) for _ in range(n_private)]
    for c in canaries:
        private += [canary_prompt + c + ["."]] * canary_repeats
    rng.shuffle(private)
    test = [_sentence(rng) for _ in range(n_test)]
    return Corpus(vocab, {"public": encode(public), "private": encode(private), "test": encode(test)},
                  canaries, canary_prompt)
